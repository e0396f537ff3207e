"""Convert FlashRAG-style JSONL (``question``, ``golden_answers``) into ATPO/Search-R1 rows.

The gold answers come from ``golden_answers`` (FlashRAG), else ``answers``, else ``answer`` (other
QA dumps), each a list of strings or one string; a record with none of them, or a malformed one, is
an error naming the file and line.

FlashRAG (``RUC-NLPIR/FlashRAG_datasets``) is where the paper's train and test sets come from
(ALGORITHM.md §7). Download a split yourself, then::

    python -m atpo_jax.data.flashrag --input hotpotqa/train.jsonl --output hotpotqa_train.parquet \\
        --data-source hotpotqa --split train [--prompt-style paper]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from atpo_jax.data.prompts import PROMPT_STYLES, build_messages, normalize_question
from atpo_jax.data.rows import (
    FLASHRAG_ANSWER_FIELDS,
    DatasetError,
    QARow,
    gold_problem,
    read_text_lines,
    write_rows,
)


def flashrag_golds(record: dict[str, Any]) -> tuple[str, list[str]]:
    """``(field, golds)``: the gold answers of a FlashRAG-style record, from the first of
    ``golden_answers`` (FlashRAG), ``answers``, ``answer`` that it has, each a list of strings or
    one string. A field that is present but malformed is an error, never skipped for the next one.

    Raises:
      ValueError: no answer field, or one that is not a non-empty list of strings / a string.
    """
    field = next((f for f in FLASHRAG_ANSWER_FIELDS if f in record), None)
    if field is None:
        raise ValueError(
            f"no answer field: expected one of {list(FLASHRAG_ANSWER_FIELDS)} "
            "(a list of answer strings or one string)"
        )
    golds = record[field]
    if isinstance(golds, str):
        golds = [golds]
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(
            f"{field!r} must be a non-empty list of strings or one string, got {record[field]!r:.80}"
        )
    problem = gold_problem(golds)
    if problem:
        raise ValueError(f"{field!r} {problem}")
    return field, golds


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "expected a JSON object"
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return "missing non-empty string 'question'"
    try:
        flashrag_golds(record)
    except ValueError as e:
        return str(e)
    return None


def convert_flashrag_records(
    records: Sequence[dict[str, Any]],
    *,
    data_source: str,
    split: str,
    style: str = "paper",
) -> list[QARow]:
    """Builds one row per record, with the prompt of ``style`` and ``extra_info = {split, index, ...}``.

    Records must already be valid (see :func:`read_flashrag_jsonl`).
    """
    rows = []
    for index, record in enumerate(records):
        _, golds = flashrag_golds(record)
        extra = {"split": split, "index": index, "question": normalize_question(record["question"])}
        if "id" in record:
            extra["id"] = str(record["id"])
        rows.append(
            QARow(
                data_source=data_source,
                prompt=build_messages(record["question"], style),
                golds=golds,
                extra_info=extra,
            )
        )
    return rows


def read_flashrag_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads and validates FlashRAG JSONL; errors list the file and line numbers of bad records."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"FlashRAG file {path!r} does not exist")
    records, problems = [], []
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {lineno}: not valid JSON ({e})")
            continue
        problem = _record_problem(record)
        if problem:
            problems.append(f"{path} line {lineno}: {problem}")
        else:
            records.append(record)
    if problems:
        shown = "\n  ".join(problems[:10])
        raise DatasetError(f"{len(problems)} malformed FlashRAG record(s):\n  {shown}")
    if not records:
        raise DatasetError(f"FlashRAG file {path!r} has no records")
    return records


def convert_flashrag(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    data_source: str,
    split: str = "train",
    style: str = "paper",
) -> int:
    """Converts a FlashRAG JSONL file to a ``.parquet``/``.jsonl`` row file; returns the row count."""
    rows = convert_flashrag_records(
        read_flashrag_jsonl(input_path), data_source=data_source, split=split, style=style
    )
    write_rows(rows, output_path)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.data.flashrag",
        description="Convert FlashRAG JSONL (question, golden_answers | answers | answer) to "
        "ATPO/Search-R1 rows.",
    )
    parser.add_argument("--input", required=True, help="FlashRAG JSONL file")
    parser.add_argument("--output", required=True, help="output .parquet or .jsonl")
    parser.add_argument("--data-source", required=True, help="benchmark name, e.g. hotpotqa")
    parser.add_argument("--split", default="train", help="value for extra_info.split")
    parser.add_argument("--prompt-style", default="paper", choices=sorted(PROMPT_STYLES))
    args = parser.parse_args(argv)
    try:
        n = convert_flashrag(
            args.input,
            args.output,
            data_source=args.data_source,
            split=args.split,
            style=args.prompt_style,
        )
    except DatasetError as e:
        sys.exit(f"flashrag: {e}")
    print(f"wrote {n} rows to {args.output}")


if __name__ == "__main__":
    main()
