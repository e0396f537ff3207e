"""ATPO/Search-R1 rows: parquet and JSONL reading/writing, malformed rows reported with file and row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atpo_jax.data import DatasetError, QARow, build_messages, read_rows, write_rows


def reference_record(i, target):
    """A row as the reference data builders write it, FlashRAG columns included."""
    return {
        "id": f"q{i}",
        "question": f"question {i}",
        "golden_answers": target,
        "data_source": "hotpotqa",
        "prompt": [{"role": "system", "content": f"instruction\nuser\nquestion {i}?"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": target}},
        "extra_info": {"split": "train", "index": i},
    }


def test_reads_reference_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.Table.from_pylist([reference_record(0, ["Paris"]), reference_record(1, ["a", "b"])]),
        path,
    )
    rows = read_rows(path)
    assert rows == [
        QARow(
            "hotpotqa",
            [{"role": "system", "content": "instruction\nuser\nquestion 0?"}],
            ["Paris"],
            "fact-reasoning",
            {"split": "train", "index": 0},
        ),
        QARow(
            "hotpotqa",
            [{"role": "system", "content": "instruction\nuser\nquestion 1?"}],
            ["a", "b"],
            "fact-reasoning",
            {"split": "train", "index": 1},
        ),
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip(tmp_path, suffix):
    rows = [
        QARow(
            "nq", build_messages("who", "short"), ["x"], extra_info={"split": "test", "index": 0}
        ),
        QARow(
            "nq",
            build_messages("what", "paper"),
            ["y", "z"],
            extra_info={"split": "test", "index": 1},
        ),
    ]
    path = tmp_path / f"rows{suffix}"
    write_rows(rows, path)
    assert read_rows(path) == rows
    first = path.read_bytes()
    write_rows(rows, path)
    assert path.read_bytes() == first  # deterministic bytes


def test_string_target_is_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(reference_record(0, "Paris")) + "\n")
    assert read_rows(path)[0].golds == ["Paris"]


def test_malformed_parquet_rows_name_file_and_row(tmp_path):
    records = [reference_record(0, ["ok"]), reference_record(1, []), reference_record(2, ["ok"])]
    records[2]["prompt"] = []
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    with pytest.raises(DatasetError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith("2 malformed row(s):")
    # Row numbers are 1-based: the second and third records.
    assert f"{path} row 2: reward_model.ground_truth.target must be a non-empty list" in message
    assert f"{path} row 3: prompt must be a non-empty list" in message


def test_malformed_jsonl_rows_name_file_and_line(tmp_path):
    good = json.dumps(reference_record(0, ["ok"]))
    no_role = reference_record(1, ["ok"])
    no_role["prompt"] = [{"content": "x"}]
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + json.dumps(no_role) + "\n" + "{oops\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl line 4: not valid JSON"):
        read_rows(path)
    path.write_text(good + "\n\n" + json.dumps(no_role) + "\n")
    with pytest.raises(
        DatasetError, match=r"bad.jsonl line 3: prompt message .* has no string 'role'"
    ):
        read_rows(path)


@pytest.mark.parametrize("field", ["golden_answers", "answers", "answer"])
def test_flashrag_jsonl_gets_a_conversion_hint(tmp_path, field):
    path = tmp_path / "flashrag.jsonl"
    path.write_text(json.dumps({"id": "1", "question": "q", field: ["a"]}) + "\n")
    with pytest.raises(DatasetError, match="line 1: .*`python -m atpo_jax.data.flashrag"):
        read_rows(path)


def search_r1_record(i, ground_truth):
    record = reference_record(i, ["unused"])
    record["reward_model"] = {"style": "rule", "ground_truth": ground_truth}
    return record


@pytest.mark.parametrize(
    ("ground_truth", "golds"),
    [
        ({"target": ["Paris", "City of Light"]}, ["Paris", "City of Light"]),
        ({"target": "Paris"}, ["Paris"]),
        (["Paris", "City of Light"], ["Paris", "City of Light"]),
        ("Paris", ["Paris"]),
    ],
    ids=["dict-of-list", "dict-of-string", "list", "string"],
)
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_ground_truth_shapes(tmp_path, ground_truth, golds, suffix):
    # Each shape as its own file: a parquet column has one type for all its rows.
    records = [search_r1_record(0, ground_truth), search_r1_record(1, ground_truth)]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [row.golds for row in read_rows(path)] == [golds, golds]


@pytest.mark.parametrize(
    ("ground_truth", "expected"),
    [
        (7, "reward_model.ground_truth must be a non-empty list of strings, got 7"),
        (
            {"answer": ["x"]},
            "reward_model.ground_truth is an object without 'target' (keys ['answer'])",
        ),
        ({"target": None}, "reward_model.ground_truth is an object without 'target'"),
        ([], "reward_model.ground_truth must be a non-empty list of strings, got []"),
        (["ok", 3], "reward_model.ground_truth has a non-string entry"),
        ({"target": [["nested"]]}, "reward_model.ground_truth.target has a non-string entry"),
    ],
    ids=["int", "dict-without-target", "null-target", "empty-list", "int-entry", "nested"],
)
def test_other_ground_truth_shapes_name_file_row_and_the_expected_shapes(
    tmp_path, ground_truth, expected
):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(search_r1_record(0, "fine"))
        + "\n"
        + json.dumps(search_r1_record(1, ground_truth))
    )
    with pytest.raises(DatasetError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith("1 malformed row(s):")
    assert f"{path} line 2: {expected}" in message
    if "non-string entry" not in expected:
        assert (
            "expected {'target': [answers]} (Search-R1/ATPO), a list of answer strings" in message
        )


def test_reward_model_without_ground_truth(tmp_path):
    path = tmp_path / "bad.parquet"
    record = reference_record(0, ["x"])
    record["reward_model"] = {"style": "rule"}
    pq.write_table(pa.Table.from_pylist([record]), path)
    with pytest.raises(DatasetError, match=f"{path} row 1: reward_model.ground_truth is missing"):
        read_rows(path)


def test_missing_columns_file_and_type(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"data_source": ["x"]}), path)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['prompt', 'reward_model'\]"):
        read_rows(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_rows(tmp_path / "none.parquet")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="use .parquet or .jsonl"):
        read_rows(tmp_path / "rows.csv")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        read_rows(tmp_path / "junk.parquet")


def test_many_bad_rows_are_counted(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"data_source": "x"}) + "\n" for _ in range(15)))
    with pytest.raises(DatasetError, match=r"15 malformed row\(s\)[\s\S]*\.\.\. and 5 more"):
        read_rows(path)


# --- empty files and empty gold answers (issue 20, item 8) -----------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_an_empty_file_is_a_data_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":  # the right columns, no rows
        pq.write_table(pa.Table.from_pylist([reference_record(0, ["x"])]).slice(0, 0), path)
    else:
        path.write_text("\n  \n")  # blank lines only
    with pytest.raises(DatasetError, match=f"{path} has no rows"):
        read_rows(path)


@pytest.mark.parametrize(
    "target",
    [[""], ["Paris", "   "], "", ["?!"]],
    ids=["empty", "one-blank-of-two", "empty-string", "punctuation-only"],
)
def test_an_empty_gold_answer_is_a_data_error_naming_the_row(tmp_path, target):
    # Only an empty \boxed{} could match such a gold: it is a broken row, not a hard question.
    path = tmp_path / "golds.jsonl"
    path.write_text(
        json.dumps(reference_record(0, ["ok"])) + "\n" + json.dumps(reference_record(1, target))
    )
    with pytest.raises(DatasetError) as info:
        read_rows(path)
    assert f"{path} line 2: reward_model.ground_truth.target entry" in str(info.value)
    assert "is empty: every gold answer needs a word" in str(info.value)


def test_golds_of_articles_only_are_kept(tmp_path):
    # "A" (a letter answer) and "The The" (a band) normalise to nothing under SQuAD rules but are
    # real answers: the reward compares them with their articles kept.
    path = tmp_path / "articles.jsonl"
    path.write_text(json.dumps(reference_record(0, ["A", "The The"])) + "\n")
    assert read_rows(path)[0].golds == ["A", "The The"]


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(reference_record(0, ["ok"])).encode()
    latin1 = json.dumps(reference_record(1, ["café"]), ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n" + latin1 + b"\n")
    with pytest.raises(DatasetError, match=f"{path} line 2: not UTF-8 text"):
        read_rows(path)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte-order mark is fine
    assert read_rows(path)[0].golds == ["ok"]
