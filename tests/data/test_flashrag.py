"""FlashRAG JSONL -> rows."""

import json
import subprocess
import sys

import pytest

from atpo_jax.data import DatasetError, build_messages, convert_flashrag, read_rows
from atpo_jax.data.flashrag import main


def write_flashrag(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_conversion_builds_reference_rows(tmp_path):
    src = tmp_path / "dev.jsonl"
    write_flashrag(
        src,
        [
            {
                "id": "a1",
                "question": " who wrote Hamlet ",
                "golden_answers": ["Shakespeare", "W. Shakespeare"],
            },
            {
                "id": "a2",
                "question": "Is Paris in France?",
                "golden_answers": "yes",
                "metadata": {},
            },
        ],
    )
    out = tmp_path / "dev.parquet"
    assert convert_flashrag(src, out, data_source="hotpotqa", split="test") == 2
    rows = read_rows(out)
    assert [r.data_source for r in rows] == ["hotpotqa", "hotpotqa"]
    assert rows[0].prompt == build_messages("who wrote Hamlet", "paper")
    assert rows[0].golds == ["Shakespeare", "W. Shakespeare"] and rows[1].golds == ["yes"]
    assert rows[0].extra_info == {
        "split": "test",
        "index": 0,
        "question": "who wrote Hamlet?",
        "id": "a1",
    }


def test_bad_records_are_listed_with_lines(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "q", "golden_answers": ["a"]}\n{"question": ""}\nnot json\n')
    with pytest.raises(DatasetError) as info:
        convert_flashrag(src, tmp_path / "o.jsonl", data_source="x")
    message = str(info.value)
    assert f"{src} line 2: missing non-empty string 'question'" in message
    assert f"{src} line 3: not valid JSON" in message


def test_cli(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_flashrag(src, [{"question": "q", "golden_answers": ["a"]}])
    main(
        [
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--data-source",
            "nq",
            "--prompt-style",
            "short",
        ]
    )
    assert "wrote 1 rows" in capsys.readouterr().out
    assert read_rows(tmp_path / "o.jsonl")[0].prompt == build_messages("q", "short")
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "atpo_jax.data.flashrag",
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "x.parquet"),
            "--data-source",
            "nq",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "missing.jsonl' does not exist" in failed.stderr


@pytest.mark.parametrize("golds", [[""], ["Paris", " "], "", []])
def test_empty_gold_answers_are_listed_with_lines(tmp_path, golds):
    src = tmp_path / "golds.jsonl"
    write_flashrag(
        src,
        [{"question": "q", "golden_answers": ["a"]}, {"question": "q", "golden_answers": golds}],
    )
    with pytest.raises(DatasetError, match=f"{src} line 2: 'golden_answers'"):
        convert_flashrag(src, tmp_path / "o.jsonl", data_source="x")


def test_non_utf8_flashrag_line(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"question": "caf\xe9?", "golden_answers": ["x"]}\n')
    with pytest.raises(DatasetError, match=f"{src} line 1: not UTF-8 text"):
        convert_flashrag(src, tmp_path / "o.jsonl", data_source="x")


@pytest.mark.parametrize(
    ("answers", "golds"),
    [
        ({"golden_answers": ["a", "b"]}, ["a", "b"]),
        ({"golden_answers": "a"}, ["a"]),
        ({"answers": ["a", "b"]}, ["a", "b"]),
        ({"answers": "a"}, ["a"]),
        ({"answer": ["a", "b"]}, ["a", "b"]),
        ({"answer": "a"}, ["a"]),
        # golden_answers (FlashRAG's own field) wins over the others.
        ({"answer": "other", "golden_answers": ["a"]}, ["a"]),
        ({"answer": "other", "answers": ["a"]}, ["a"]),
    ],
)
def test_answer_fields(tmp_path, answers, golds):
    src = tmp_path / "in.jsonl"
    write_flashrag(src, [{"question": "q", **answers}])
    convert_flashrag(src, tmp_path / "o.jsonl", data_source="nq")
    assert read_rows(tmp_path / "o.jsonl")[0].golds == golds


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({}, "no answer field: expected one of ['golden_answers', 'answers', 'answer']"),
        ({"answer": 42}, "'answer' must be a non-empty list of strings or one string, got 42"),
        ({"answers": [1, 2]}, "'answers' must be a non-empty list of strings or one string"),
        # A malformed golden_answers is an error even when a good 'answer' follows it.
        ({"golden_answers": None, "answer": "a"}, "'golden_answers' must be a non-empty list"),
    ],
    ids=["none", "int", "int-list", "no-fallback"],
)
def test_bad_answer_fields_name_file_and_line(tmp_path, answers, expected):
    src = tmp_path / "bad.jsonl"
    write_flashrag(src, [{"question": "q", "answer": "fine"}, {"question": "q", **answers}])
    with pytest.raises(DatasetError) as info:
        convert_flashrag(src, tmp_path / "o.jsonl", data_source="x")
    assert f"{src} line 2: {expected}" in str(info.value)
