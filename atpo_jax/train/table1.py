"""The paper's Table 1 from an evaluation's per-``data_source`` results (ALGORITHM.md §10).

Columns: EM of HotpotQA, 2Wiki, MuSiQue, Bamboogle, their multi-hop average, NQ, TriviaQA, PopQA,
their single-hop average; we add an overall average over all seven (the paper has none).

How the averages are defined. The paper's group averages are the EM over all the group's questions
(the reference evaluates each group's merged test file), i.e. the per-benchmark EMs weighted by
question count, not their plain mean: with FlashRAG's split sizes (HotpotQA dev 7405, 2Wiki dev
12576, MuSiQue dev 2417, Bamboogle test 125; NQ test 3610, TriviaQA test 11313, PopQA test 14267)
the weighted mean reproduces the reported averages to ±0.03 in 11 of the table's 12 (the plain
mean misses them by 0.3 to 4 points; ``tests/train/test_table1.py`` checks the Qwen3-4B rows). So
``em`` / ``f1`` of a group (and of ``overall``) are that: the mean over the questions of its
members. ``plain_em`` / ``plain_f1`` are the unweighted mean of the members' EMs, reported beside
it for comparison with work that averages that way.

A group with a member absent from the results is ``partial`` and lists the members it used; one
with no member is ``absent``. Data sources outside the seven (the synthetic world's
``synthetic_<k>hop``, say) go to ``other``, with their own averages by the same definitions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from atpo_jax.data.benchmarks import BENCHMARKS, BY_NAME, GROUP_LABELS, Hops, group_members

_ALL = tuple(b.name for b in BENCHMARKS)


def _average(members: Sequence[str], by_source: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    present = [m for m in members if m in by_source and by_source[m]["n"] > 0]
    missing = [m for m in members if m not in present]
    status = "absent" if not present else ("partial" if missing else "complete")
    result: dict[str, Any] = {"status": status, "members": present, "missing": missing}
    if not present:
        return {**result, "n": 0, "em": None, "f1": None, "plain_em": None, "plain_f1": None}
    n = sum(by_source[m]["n"] for m in present)
    for metric in ("em", "f1"):
        # Over the questions (the paper's definition), and the plain mean over the members.
        result[metric] = sum(by_source[m][metric] * by_source[m]["n"] for m in present) / n
        result[f"plain_{metric}"] = sum(by_source[m][metric] for m in present) / len(present)
    return {**result, "n": n}


def table1(results: Mapping[str, Any]) -> dict[str, Any]:
    """Table 1 of ``results`` (:func:`atpo_jax.train.evaluation.evaluate`'s dict); see the module doc.

    Returns ``{"benchmarks": {name: {label, em, f1, n}}, "multi_hop": avg, "single_hop": avg,
    "overall": avg, "other": {"sources": {name: {em, f1, n}}, "average": avg}, "all_questions":
    {em, f1, n}}`` where each ``avg`` is ``{status, members, missing, n, em, f1, plain_em,
    plain_f1}``; EM and F1 are fractions (the markdown shows %).
    """
    by_source = results["by_source"]
    others = sorted(s for s in by_source if s not in BY_NAME)
    return {
        "benchmarks": {
            b.name: {"label": b.label, **{k: by_source[b.name][k] for k in ("em", "f1", "n")}}
            for b in BENCHMARKS
            if b.name in by_source
        },
        str(Hops.MULTI): _average(group_members(Hops.MULTI), by_source),
        str(Hops.SINGLE): _average(group_members(Hops.SINGLE), by_source),
        "overall": _average(_ALL, by_source),
        "other": {
            "sources": {s: {k: by_source[s][k] for k in ("em", "f1", "n")} for s in others},
            "average": _average(others, by_source),
        },
        "all_questions": {k: results[k] for k in ("em", "f1", "n")},
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _avg_cell(avg: Mapping[str, Any], metric: str) -> str:
    if avg["status"] == "partial":
        members = len(avg["members"]) + len(avg["missing"])
        return f"{_pct(avg[metric])} (partial {len(avg['members'])}/{members})"
    return _pct(avg[metric])


def markdown(table: Mapping[str, Any]) -> str:
    """Table 1 as markdown: one row each for EM, F1 and question counts, then notes on partial
    groups, the plain means, and the ``other`` section."""
    columns: list[tuple[str, Any]] = []  # (heading, benchmark name or group key)
    for hops in (Hops.MULTI, Hops.SINGLE):
        columns += [(BY_NAME[n].label, n) for n in group_members(hops)]
        columns.append((GROUP_LABELS[hops], str(hops)))
    columns.append(("overall", "overall"))

    def cell(key: str, metric: str) -> str:
        if key in BY_NAME:
            entry = table["benchmarks"].get(key)
            if entry is None:
                return "—"
            return str(entry["n"]) if metric == "n" else _pct(entry[metric])
        if table[key]["status"] == "absent":
            return "—"
        return str(table[key]["n"]) if metric == "n" else _avg_cell(table[key], metric)

    lines = [
        "| | " + " | ".join(h for h, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for metric, name in (("em", "EM"), ("f1", "F1"), ("n", "n")):
        lines.append(f"| {name} | " + " | ".join(cell(k, metric) for _, k in columns) + " |")
    lines.append("")  # ends the table: the notes are paragraphs
    lines.append(
        "Averages are over the group's questions (the paper's definition: per-benchmark EMs "
        "weighted by question count); EM and F1 in %."
    )
    for key, label in (
        (str(Hops.MULTI), "multi-hop"),
        (str(Hops.SINGLE), "single-hop"),
        ("overall", "overall"),
    ):
        avg = table[key]
        if avg["status"] == "partial":
            lines.append(
                f"{label} average is partial: over {', '.join(avg['members'])}; "
                f"not in the evaluation data: {', '.join(avg['missing'])}."
            )
    plain = [
        f"{label} {_pct(table[key]['plain_em'])}"
        for key, label in (
            (str(Hops.MULTI), "multi-hop"),
            (str(Hops.SINGLE), "single-hop"),
            ("overall", "overall"),
        )
        if table[key]["status"] != "absent"
    ]
    if plain:
        lines.append("Plain mean of the per-benchmark EMs: " + ", ".join(plain) + ".")
    else:
        lines.append("None of the paper's seven benchmarks is in the evaluation data.")
    other = table["other"]
    if other["sources"]:
        lines += [
            "",
            "Other data sources (not in the paper's Table 1):",
            "",
            "| data_source | n | EM | F1 |",
            "|---|---|---|---|",
        ]
        for source, r in other["sources"].items():
            lines.append(f"| {source} | {r['n']} | {_pct(r['em'])} | {_pct(r['f1'])} |")
        avg = other["average"]
        lines.append(
            f"| over their questions | {avg['n']} | {_pct(avg['em'])} | {_pct(avg['f1'])} |"
        )
        lines.append(f"| plain mean | | {_pct(avg['plain_em'])} | {_pct(avg['plain_f1'])} |")
    return "\n".join(lines)


def save(results: Mapping[str, Any], evaluation_path: str) -> tuple[str, str]:
    """Writes Table 1 of ``results`` next to their JSON ``<stem>.json``: ``<stem>_table1.json``
    and ``<stem>_table1.md``; returns both paths."""
    table = table1(results)
    stem = os.path.splitext(evaluation_path)[0]
    paths = (f"{stem}_table1.json", f"{stem}_table1.md")
    with open(paths[0], "w") as f:
        json.dump(table, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(table) + "\n")
    return paths
