"""``python -m atpo_jax.data.build_benchmarks`` on small FlashRAG-format directories made here."""

import json
import os
import subprocess
import sys

import pytest

from atpo_jax.data import DatasetError, build_messages, read_rows
from atpo_jax.data.build_benchmarks import build_benchmarks, main

# The splits each benchmark has on FlashRAG (ALGORITHM.md §7), with a few records each.
FLASHRAG_SPLITS = {
    "hotpotqa": {"train": 3, "dev": 2},
    "2wikimultihopqa": {"train": 2, "dev": 3},
    "musique": {"train": 2, "dev": 1},
    "bamboogle": {"test": 2},
    "nq": {"train": 4, "dev": 2, "test": 3},
    "triviaqa": {"train": 2, "dev": 1, "test": 2},
    "popqa": {"test": 1},
}


def question(name, split, i):
    return f"{name} {split} question {i}"


def make_flashrag(root, splits=FLASHRAG_SPLITS):
    """``root/<name>/<split>.jsonl``; answers in the three accepted fields, by record."""
    for name, sizes in splits.items():
        os.makedirs(root / name, exist_ok=True)
        for split, n in sizes.items():
            with open(root / name / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    field = ("golden_answers", "answers", "answer")[i % 3]
                    golds = [f"{name}-{split}-{i}", "alias"] if field != "answer" else f"{name}-{i}"
                    record = {
                        "id": f"{split}_{i}",
                        "question": question(name, split, i),
                        field: golds,
                    }
                    f.write(json.dumps(record) + "\n")
    return root


def test_builds_the_reference_files(tmp_path):
    src = make_flashrag(tmp_path / "flashrag")
    out = tmp_path / "out"
    report = build_benchmarks(str(src), str(out))

    # Each test file: test split, else dev (HotpotQA, 2Wiki, MuSiQue); all rows split="test".
    expected_split = {
        "hotpotqa": "dev",
        "2wikimultihopqa": "dev",
        "musique": "dev",
        "bamboogle": "test",
        "nq": "test",
        "triviaqa": "test",
        "popqa": "test",
    }
    assert {f.benchmark: (f.split, f.rows) for f in report.tests} == {
        n: (s, FLASHRAG_SPLITS[n][s]) for n, s in expected_split.items()
    }
    for name, split in expected_split.items():
        rows = read_rows(out / name / "test.parquet")
        assert [r.data_source for r in rows] == [name] * FLASHRAG_SPLITS[name][split]
        assert rows[0].prompt == build_messages(question(name, split, 0), "paper")
        assert rows[0].golds == [f"{name}-{split}-0", "alias"]
        assert [r.extra_info["split"] for r in rows] == ["test"] * len(rows)
        assert [r.extra_info["index"] for r in rows] == list(range(len(rows)))
    assert read_rows(out / "bamboogle" / "test.parquet")[1].golds == ["bamboogle-test-1", "alias"]
    assert read_rows(out / "nq" / "test.parquet")[2].golds == ["nq-2"]  # a one-string 'answer'

    # Training files: the reference's NQ and HotpotQA train splits, and only those.
    assert [(f.benchmark, f.split, f.rows) for f in report.trains] == [
        ("hotpotqa", "train", 3),
        ("nq", "train", 4),
    ]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(expected_split)
    assert sorted(os.listdir(out / "nq")) == ["test.parquet", "train.parquet"]
    assert os.listdir(out / "popqa") == ["test.parquet"]
    train = read_rows(out / "nq" / "train.parquet")
    assert [r.extra_info["split"] for r in train] == ["train"] * 4
    assert train[3].prompt == build_messages(question("nq", "train", 3), "paper")

    # The merged test files: the groups' members in the reference's order, all their rows.
    multi = read_rows(out / "multihop_test.parquet")
    assert [r.data_source for r in multi] == ["hotpotqa"] * 2 + ["2wikimultihopqa"] * 3 + [
        "musique"
    ] + ["bamboogle"] * 2
    single = read_rows(out / "singlehop_test.parquet")
    assert [r.data_source for r in single] == ["nq"] * 3 + ["triviaqa"] * 2 + ["popqa"]
    assert single[3].prompt == build_messages(question("triviaqa", "test", 0), "paper")
    assert [(m.output, m.rows, m.missing) for m in report.merged] == [
        ("multihop_test.parquet", 8, ()),
        ("singlehop_test.parquet", 6, ()),
    ]
    assert report.warnings == ()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_style"] == "paper"
    by_name = {f["benchmark"]: f for f in manifest["test"]}
    assert by_name["musique"]["split"] == "dev" and by_name["musique"]["rows"] == 1
    assert by_name["musique"]["source"] == str(src / "musique" / "dev.jsonl")
    assert manifest["merged"][0]["members"] == [
        "hotpotqa",
        "2wikimultihopqa",
        "musique",
        "bamboogle",
    ]


def test_a_missing_benchmark_is_an_error_and_nothing_is_written(tmp_path):
    splits = {k: v for k, v in FLASHRAG_SPLITS.items() if k not in ("musique", "popqa")}
    src = make_flashrag(tmp_path / "flashrag", splits)
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as info:
        build_benchmarks(str(src), str(out))
    message = str(info.value)
    assert f"musique: none of test.jsonl, dev.jsonl, train.jsonl in {src / 'musique'}" in message
    assert f"popqa: none of test.jsonl, dev.jsonl, train.jsonl in {src / 'popqa'}" in message
    assert "--benchmarks" in message
    assert not out.exists()
    # A training benchmark needs its train split.
    os.remove(src / "nq" / "train.jsonl")
    with pytest.raises(DatasetError, match=r"nq \(training\): .*nq/train.jsonl does not exist"):
        build_benchmarks(str(src), str(out), benchmarks=["nq"])
    assert not out.exists()


def test_a_subset_gives_partial_merged_files_with_a_warning(tmp_path, capsys):
    src = make_flashrag(tmp_path / "flashrag")
    out = tmp_path / "out"
    main(["--src", str(src), "--out", str(out), "--benchmarks", "bamboogle,hotpotqa,hotpotqa"])
    printed = capsys.readouterr().out
    multi = read_rows(out / "multihop_test.parquet")
    # Table-1 order in the merged file whatever the order asked for; duplicates dropped.
    assert [r.data_source for r in multi] == ["hotpotqa"] * 2 + ["bamboogle"] * 2
    assert not (out / "singlehop_test.parquet").exists()
    assert sorted(os.listdir(out / "hotpotqa")) == ["test.parquet", "train.parquet"]
    assert "| bamboogle | test | 2 | bamboogle/test.parquet |" in printed
    assert "| hotpotqa | dev | 2 | hotpotqa/test.parquet |" in printed
    assert "| hotpotqa | train | 3 | hotpotqa/train.parquet |" in printed
    assert (
        "| hotpotqa + bamboogle; missing 2wikimultihopqa, musique | test | 4 "
        "| multihop_test.parquet |" in printed
    )
    assert (
        "warning: multihop_test.parquet lacks ['2wikimultihopqa', 'musique'] (not in "
        "--benchmarks): its multi_hop average is partial" in printed
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"][0]["missing"] == ["2wikimultihopqa", "musique"]
    assert (
        f"use them with --config.data.train_files={out / 'hotpotqa' / 'train.parquet'} "
        f"--config.data.eval_files={out / 'multihop_test.parquet'}" in printed
    )


def test_train_option_and_a_train_only_benchmark(tmp_path):
    src = make_flashrag(tmp_path / "flashrag", {"popqa": {"train": 2}, "nq": {"test": 1}})
    out = tmp_path / "out"
    report = build_benchmarks(str(src), str(out), benchmarks=["popqa", "nq"], train=["popqa"])
    assert [(f.benchmark, f.split) for f in report.tests] == [("popqa", "train"), ("nq", "test")]
    assert [f.benchmark for f in report.trains] == ["popqa"]
    assert report.warnings == (
        "popqa: FlashRAG has only a train split, so its test file is the training data",
        "singlehop_test.parquet lacks ['triviaqa'] (not in --benchmarks): its single_hop "
        "average is partial",
    )
    report = build_benchmarks(str(src), str(tmp_path / "out2"), benchmarks=["nq"], train=[])
    assert report.trains == ()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--benchmarks", "nq,2wiki"], "--benchmarks: unknown benchmark(s) ['2wiki']"),
        (["--train", "hotpot"], "--train: unknown benchmark(s) ['hotpot']"),
        (["--benchmarks", ","], "--benchmarks is empty"),
    ],
)
def test_cli_errors(tmp_path, argv, expected):
    src = make_flashrag(tmp_path / "flashrag")
    with pytest.raises(SystemExit) as info:
        main(["--src", str(src), "--out", str(tmp_path / "out"), *argv])
    assert str(info.value).startswith("build_benchmarks: ") and expected in str(info.value)
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_a_bad_record_names_file_and_line_and_writes_nothing(tmp_path):
    src = make_flashrag(tmp_path / "flashrag")
    with open(src / "popqa" / "test.jsonl", "a") as f:
        f.write(json.dumps({"question": "q", "answer": 3}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=f"{src / 'popqa' / 'test.jsonl'} line 2: 'answer' must"):
        build_benchmarks(str(src), str(out))
    assert not out.exists()


def test_module_entry_point_exits_1_with_one_message(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "atpo_jax.data.build_benchmarks",
            "--src",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--benchmarks",
            "bamboogle",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "build_benchmarks: missing FlashRAG file(s):\n  bamboogle: none of"
    )
