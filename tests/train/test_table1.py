"""The paper's Table 1 from per-``data_source`` results: hand-computed averages, partial groups,
other sources, and the files written beside an evaluation."""

import json

import pytest

from atpo_jax.train import table1


def source(em, n, f1=None):
    return {"em": em, "f1": em if f1 is None else f1, "n": n}


def results_of(by_source):
    n = sum(r["n"] for r in by_source.values())
    return {
        "em": sum(r["em"] * r["n"] for r in by_source.values()) / n,
        "f1": sum(r["f1"] * r["n"] for r in by_source.values()) / n,
        "n": n,
        "by_source": by_source,
    }


ALL_SEVEN = {
    "hotpotqa": source(0.5, 4, f1=0.75),  # 2 of 4 right
    "2wikimultihopqa": source(0.25, 4),  # 1 of 4
    "musique": source(0.0, 2),  # 0 of 2
    "bamboogle": source(1.0, 2),  # 2 of 2
    "nq": source(0.5, 2),  # 1 of 2
    "triviaqa": source(1.0, 1),  # 1 of 1
    "popqa": source(0.0, 1),  # 0 of 1
}


def test_averages_by_hand():
    t = table1.table1(results_of(ALL_SEVEN))
    multi, single, overall = t["multi_hop"], t["single_hop"], t["overall"]
    # Over the questions: 5 of 12 multi-hop, 2 of 4 single-hop, 7 of 16 overall.
    assert multi["em"] == pytest.approx(5 / 12) and multi["n"] == 12
    assert single["em"] == pytest.approx(2 / 4) and single["n"] == 4
    assert overall["em"] == pytest.approx(7 / 16) and overall["n"] == 16
    # Plain means of the per-benchmark EMs.
    assert multi["plain_em"] == pytest.approx((0.5 + 0.25 + 0.0 + 1.0) / 4)
    assert single["plain_em"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert overall["plain_em"] == pytest.approx(3.25 / 7)
    # F1 likewise: HotpotQA's 0.75 F1 is 3 of its 4 questions' worth.
    assert multi["f1"] == pytest.approx((3 + 1 + 0 + 2) / 12)
    assert [m["status"] for m in (multi, single, overall)] == ["complete"] * 3
    assert multi["members"] == ["hotpotqa", "2wikimultihopqa", "musique", "bamboogle"]
    assert t["benchmarks"]["2wikimultihopqa"] == {"label": "2Wiki", "em": 0.25, "f1": 0.25, "n": 4}
    assert t["other"]["sources"] == {} and t["other"]["average"]["status"] == "absent"

    text = table1.markdown(t)
    lines = text.splitlines()
    assert lines[0] == (
        "| | HotpotQA | 2Wiki | MuSiQue | Bamboogle | multi-hop avg | NQ | TriviaQA | PopQA "
        "| single-hop avg | overall |"
    )
    assert lines[2] == (
        "| EM | 50.00 | 25.00 | 0.00 | 100.00 | 41.67 | 50.00 | 100.00 | 0.00 | 50.00 | 43.75 |"
    )
    assert lines[3].startswith("| F1 | 75.00 | 25.00 | 0.00 | 100.00 | 50.00 |")
    assert lines[4] == "| n | 4 | 4 | 2 | 2 | 12 | 2 | 1 | 1 | 4 | 16 |"
    assert lines[5] == ""  # the table ends before the notes
    assert (
        "Plain mean of the per-benchmark EMs: multi-hop 43.75, single-hop 50.00, overall 46.43."
        in text
    )
    assert "partial" not in text and "Other data sources" not in text


# Qwen3-4B rows of the paper's Table 1 (ALGORITHM.md §10): the four multi-hop EMs, their reported
# average, the three single-hop EMs, their reported average.
PAPER_ROWS = {
    "GRPO": ((44.76, 51.40, 21.60, 50.40), 46.02, (45.98, 65.17, 49.18), 54.97),
    "GSPO": ((47.07, 49.25, 22.68, 50.40), 45.69, (46.01, 64.24, 48.50), 54.28),
    "AEPO": ((46.36, 51.78, 23.47, 50.40), 46.95, (45.71, 64.66, 50.13), 55.20),
}
# FlashRAG's sizes of the splits the reference evaluates on (dev for the first three, test else).
SIZES = {
    "hotpotqa": 7405,
    "2wikimultihopqa": 12576,
    "musique": 2417,
    "bamboogle": 125,
    "nq": 3610,
    "triviaqa": 11313,
    "popqa": 14267,
}


@pytest.mark.parametrize("method", sorted(PAPER_ROWS))
def test_the_paper_averages_are_over_questions(method):
    multi_ems, multi_avg, single_ems, single_avg = PAPER_ROWS[method]
    ems = dict(zip(SIZES, (*multi_ems, *single_ems), strict=True))
    t = table1.table1(results_of({n: source(ems[n] / 100, SIZES[n]) for n in SIZES}))
    # The reported per-benchmark EMs are rounded to 0.01, so the averages agree to about that.
    assert 100 * t["multi_hop"]["em"] == pytest.approx(multi_avg, abs=0.015)
    assert 100 * t["single_hop"]["em"] == pytest.approx(single_avg, abs=0.015)
    # The plain mean is a different number: more than a point off in each of these rows.
    assert abs(100 * t["multi_hop"]["plain_em"] - multi_avg) > 1
    assert abs(100 * t["single_hop"]["plain_em"] - single_avg) > 1


def test_a_partial_group_lists_its_members():
    by_source = {k: v for k, v in ALL_SEVEN.items() if k not in ("2wikimultihopqa", "popqa")}
    t = table1.table1(results_of(by_source))
    multi, single = t["multi_hop"], t["single_hop"]
    assert multi["status"] == "partial" and multi["missing"] == ["2wikimultihopqa"]
    assert multi["members"] == ["hotpotqa", "musique", "bamboogle"]
    assert multi["em"] == pytest.approx(4 / 8)  # (2 + 0 + 2) of (4 + 2 + 2)
    assert multi["plain_em"] == pytest.approx(1.5 / 3)
    assert single["em"] == pytest.approx(2 / 3) and single["plain_em"] == pytest.approx(0.75)
    assert t["overall"]["missing"] == ["2wikimultihopqa", "popqa"]
    text = table1.markdown(t)
    assert (
        "| EM | 50.00 | — | 0.00 | 100.00 | 50.00 (partial 3/4) | 50.00 | 100.00 | — "
        "| 66.67 (partial 2/3) | 54.55 (partial 5/7) |" in text
    )
    assert "| n | 4 | — | 2 | 2 | 8 | 2 | 1 | — | 3 | 11 |" in text
    assert (
        "multi-hop average is partial: over hotpotqa, musique, bamboogle; not in the evaluation "
        "data: 2wikimultihopqa." in text
    )
    assert (
        "single-hop average is partial: over nq, triviaqa; not in the evaluation data: popqa."
        in text
    )


def test_other_sources_get_their_own_section():
    # The synthetic world's sources: no paper benchmark at all.
    by_source = {
        "synthetic_1hop": source(0.75, 4, f1=0.8),
        "synthetic_2hop": source(0.5, 2),
        "synthetic_3hop": source(0.0, 2),
    }
    t = table1.table1(results_of(by_source))
    assert t["benchmarks"] == {}
    for key in ("multi_hop", "single_hop", "overall"):
        assert t[key]["status"] == "absent" and t[key]["em"] is None
    other = t["other"]["average"]
    assert other["em"] == pytest.approx(4 / 8) and other["plain_em"] == pytest.approx(1.25 / 3)
    assert t["all_questions"] == {"em": pytest.approx(0.5), "f1": pytest.approx(4.2 / 8), "n": 8}
    text = table1.markdown(t)
    assert "| EM | — | — | — | — | — | — | — | — | — | — |" in text
    assert "None of the paper's seven benchmarks is in the evaluation data." in text
    assert "| synthetic_1hop | 4 | 75.00 | 80.00 |" in text
    assert "| over their questions | 8 | 50.00 | 52.50 |" in text
    assert "| plain mean | | 41.67 | 43.33 |" in text

    # Mixed: paper benchmarks in the table, the rest below it.
    t = table1.table1(results_of({"nq": source(0.5, 2), **by_source}))
    assert t["single_hop"]["status"] == "partial" and t["single_hop"]["members"] == ["nq"]
    assert sorted(t["other"]["sources"]) == sorted(by_source)


def test_save_writes_json_and_markdown_beside_the_evaluation(tmp_path):
    results = results_of(ALL_SEVEN)
    path = tmp_path / "evaluation_step_000004.json"
    json_path, md_path = table1.save(results, str(path))
    assert json_path == str(tmp_path / "evaluation_step_000004_table1.json")
    assert md_path == str(tmp_path / "evaluation_step_000004_table1.md")
    with open(json_path) as f:
        assert json.load(f) == json.loads(json.dumps(table1.table1(results)))
    with open(md_path) as f:
        assert f.read() == table1.markdown(table1.table1(results)) + "\n"
