"""Build the paper's training and test files from a local copy of FlashRAG's seven benchmarks.

    python -m atpo_jax.data.build_benchmarks --src FLASHRAG_DIR --out DATA_DIR \\
        [--benchmarks nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle] \\
        [--train nq,hotpotqa] [--prompt-style paper]

``FLASHRAG_DIR`` has FlashRAG's layout, ``<name>/{train,dev,test}.jsonl`` (download
``RUC-NLPIR/FlashRAG_datasets`` yourself; nothing is fetched here). What the reference's
``data_process`` scripts make (ALGORITHM.md §7), as ATPO/Search-R1 parquet rows with the paper's
prompt and ``data_source = <name>``::

    <out>/<name>/test.parquet     each benchmark's test split, else dev, else train (split="test")
    <out>/<name>/train.parquet    the training benchmarks' train split (default NQ and HotpotQA)
    <out>/multihop_test.parquet   hotpotqa + 2wikimultihopqa + musique + bamboogle test rows
    <out>/singlehop_test.parquet  nq + triviaqa + popqa test rows
    <out>/manifest.json           per benchmark: the split used, its source file and row counts

Train on ``nq/train.parquet,hotpotqa/train.parquet`` and evaluate on the two merged files (the
evaluation then reports the paper's Table 1).

A requested benchmark with no split file is an error, and nothing is written: the reference's
builders fail too when a dataset is missing, and a merged file that silently lacks a benchmark
would change the group's average. To build fewer benchmarks, name them with ``--benchmarks``; a
merged file of a group with members left out is then written with a warning naming them, and the
manifest lists the members it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from atpo_jax.data.benchmarks import (
    BENCHMARKS,
    BY_NAME,
    GROUP_TEST_FILES,
    TEST_SPLIT_PREFERENCE,
    Hops,
    group_members,
)
from atpo_jax.data.flashrag import convert_flashrag_records, read_flashrag_jsonl
from atpo_jax.data.prompts import PROMPT_STYLES
from atpo_jax.data.rows import DatasetError, QARow, write_rows

REFERENCE_TRAIN = tuple(b.name for b in BENCHMARKS if b.trains)


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """One output file built from one FlashRAG split."""

    benchmark: str
    split: str  # the FlashRAG split read: train, dev or test
    source: str  # the JSONL it was read from
    output: str  # relative to --out
    rows: int


@dataclasses.dataclass(frozen=True)
class MergedFile:
    """A group's merged test file."""

    output: str  # relative to --out
    members: tuple[str, ...]
    missing: tuple[str, ...]
    rows: int


@dataclasses.dataclass(frozen=True)
class BuildReport:
    tests: tuple[SplitFile, ...]
    trains: tuple[SplitFile, ...]
    merged: tuple[MergedFile, ...]
    warnings: tuple[str, ...]

    def manifest(self, src: str, style: str) -> dict[str, Any]:
        return {
            "src": os.path.abspath(src),
            "prompt_style": style,
            "test": [dataclasses.asdict(f) for f in self.tests],
            "train": [dataclasses.asdict(f) for f in self.trains],
            "merged": [dataclasses.asdict(f) for f in self.merged],
            "warnings": list(self.warnings),
        }


def parse_names(value: str, option: str) -> list[str]:
    """Comma-separated benchmark names (duplicates dropped, order kept); unknown ones are an error."""
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise DatasetError(
            f"{option}: unknown benchmark(s) {unknown}; the paper's are {[b.name for b in BENCHMARKS]} "
            "(FlashRAG's dataset names)"
        )
    return names


def _split_path(src: str, name: str, split: str) -> str:
    return os.path.join(src, name, f"{split}.jsonl")


def _test_split(src: str, name: str) -> str | None:
    """The split the reference evaluates ``name`` on: the first of test, dev, train present."""
    return next(
        (s for s in TEST_SPLIT_PREFERENCE if os.path.isfile(_split_path(src, name, s))), None
    )


def build_benchmarks(
    src: str,
    out: str,
    *,
    benchmarks: Sequence[str] | None = None,
    train: Sequence[str] | None = None,
    style: str = "paper",
) -> BuildReport:
    """Builds the files described in the module doc; returns what it wrote.

    Args:
      src: the FlashRAG directory (``<src>/<name>/<split>.jsonl``).
      out: the output directory (created).
      benchmarks: test benchmarks to build (default: all seven).
      train: benchmarks whose ``train`` split becomes a training file (default: the reference's
        NQ and HotpotQA, those of them in ``benchmarks``).
      style: the prompt style (``paper`` by default).

    Raises:
      DatasetError: an unknown name, a missing split file or a malformed record; every input is
        read and checked before anything is written.
    """
    if style not in PROMPT_STYLES:
        raise DatasetError(f"--prompt-style={style!r}: choose one of {sorted(PROMPT_STYLES)}")
    if not os.path.isdir(src):
        raise DatasetError(f"--src={src!r} is not a directory (FlashRAG layout: <name>/test.jsonl)")
    names = list(benchmarks) if benchmarks is not None else [b.name for b in BENCHMARKS]
    if not names:
        raise DatasetError("--benchmarks is empty: name at least one benchmark")
    trains = [n for n in REFERENCE_TRAIN if n in names] if train is None else list(train)

    missing = []
    tests: dict[str, tuple[str, str]] = {}  # name -> (split, path)
    for name in names:
        split = _test_split(src, name)
        if split is None:
            wanted = ", ".join(f"{s}.jsonl" for s in TEST_SPLIT_PREFERENCE)
            missing.append(f"{name}: none of {wanted} in {os.path.join(src, name)}")
        else:
            tests[name] = (split, _split_path(src, name, split))
    for name in trains:
        if not os.path.isfile(_split_path(src, name, "train")):
            missing.append(f"{name} (training): {_split_path(src, name, 'train')} does not exist")
    if missing:
        raise DatasetError(
            "missing FlashRAG file(s):\n  "
            + "\n  ".join(missing)
            + "\ndownload them from RUC-NLPIR/FlashRAG_datasets into --src, or leave those "
            "benchmarks out with --benchmarks (test) / --train (training)"
        )

    # Read and check everything first, so a bad record leaves no half-built output behind.
    test_rows = {name: _convert(path, name, "test", style) for name, (split, path) in tests.items()}
    train_rows = {
        name: _convert(_split_path(src, name, "train"), name, "train", style) for name in trains
    }

    warnings = []
    for name in trains:
        if tests.get(name, ("",))[0] == "train":
            warnings.append(
                f"{name}: FlashRAG has only a train split, so its test file is the training data"
            )
    os.makedirs(out, exist_ok=True)
    test_files = []
    for name, (split, path) in tests.items():
        test_files.append(_write(test_rows[name], out, name, "test", split, path))
    train_files = [
        _write(train_rows[name], out, name, "train", "train", _split_path(src, name, "train"))
        for name in trains
    ]
    merged = []
    for hops in (Hops.MULTI, Hops.SINGLE):
        members = tuple(n for n in group_members(hops) if n in test_rows)
        if not members:
            continue
        left_out = tuple(n for n in group_members(hops) if n not in test_rows)
        rows = [row for n in members for row in test_rows[n]]
        write_rows(rows, os.path.join(out, GROUP_TEST_FILES[hops]))
        merged.append(MergedFile(GROUP_TEST_FILES[hops], members, left_out, len(rows)))
        if left_out:
            warnings.append(
                f"{GROUP_TEST_FILES[hops]} lacks {list(left_out)} (not in --benchmarks): its "
                f"{hops} average is partial"
            )
    report = BuildReport(tuple(test_files), tuple(train_files), tuple(merged), tuple(warnings))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(report.manifest(src, style), f, indent=1)
    return report


def _convert(path: str, name: str, split: str, style: str) -> list[QARow]:
    return convert_flashrag_records(
        read_flashrag_jsonl(path), data_source=name, split=split, style=style
    )


def _write(rows: list[QARow], out: str, name: str, kind: str, split: str, source: str) -> SplitFile:
    output = os.path.join(name, f"{kind}.parquet")
    os.makedirs(os.path.join(out, name), exist_ok=True)
    write_rows(rows, os.path.join(out, output))
    return SplitFile(name, split, os.path.abspath(source), output, len(rows))


def format_report(report: BuildReport, out: str) -> str:
    """The per-benchmark table (split used, rows, file) and the merged files, for the terminal."""
    lines = ["| benchmark | split read | rows | file |", "|---|---|---|---|"]
    for f in (*report.tests, *report.trains):
        lines.append(f"| {f.benchmark} | {f.split} | {f.rows} | {f.output} |")
    for m in report.merged:
        partial = f"; missing {', '.join(m.missing)}" if m.missing else ""
        lines.append(f"| {' + '.join(m.members)}{partial} | test | {m.rows} | {m.output} |")
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append(f"wrote {os.path.join(out, 'manifest.json')}")
    flags = []
    if report.trains:
        files = ",".join(os.path.join(out, f.output) for f in report.trains)
        flags.append(f"--config.data.train_files={files}")
    if report.merged:
        files = ",".join(os.path.join(out, m.output) for m in report.merged)
        flags.append(f"--config.data.eval_files={files}")
    if flags:
        lines.append("use them with " + " ".join(flags))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.data.build_benchmarks",
        description="Build the paper's train/test parquet files from local FlashRAG JSONL files.",
    )
    parser.add_argument(
        "--src", required=True, help="FlashRAG directory: <name>/{train,dev,test}.jsonl"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--benchmarks",
        default=",".join(b.name for b in BENCHMARKS),
        help="comma-separated test benchmarks (default: all seven)",
    )
    parser.add_argument(
        "--train",
        default=None,
        help="comma-separated benchmarks whose train split to convert (default: nq,hotpotqa, "
        "those of them in --benchmarks; '' for none)",
    )
    parser.add_argument("--prompt-style", default="paper", choices=sorted(PROMPT_STYLES))
    args = parser.parse_args(argv)
    try:
        report = build_benchmarks(
            args.src,
            args.out,
            benchmarks=parse_names(args.benchmarks, "--benchmarks"),
            train=None if args.train is None else parse_names(args.train, "--train"),
            style=args.prompt_style,
        )
    except DatasetError as e:
        sys.exit(f"build_benchmarks: {e}")
    print(format_report(report, args.out))


if __name__ == "__main__":
    main()
