"""QA dataset rows in the ATPO/Search-R1 format, read from and written to parquet (pyarrow) or JSONL.

A row (ALGORITHM.md §7)::

    {"data_source": "hotpotqa",
     "prompt": [{"role": "system", "content": "<instruction>\\nuser\\n<question>?"}],
     "ability": "fact-reasoning",
     "reward_model": {"style": "rule", "ground_truth": {"target": ["gold 1", "gold 2"]}},
     "extra_info": {"split": "train", "index": 0, ...}}

``reward_model.ground_truth`` may also be a list of answers or one answer string (other Search-R1
derivatives write those), and ``target`` one string. Other columns (the reference keeps FlashRAG's
``id``, ``question``, ``golden_answers``, ...) are ignored. A malformed row is an error naming the file
and its 1-based row (parquet) or line (JSONL) number and what was expected; rows are never skipped
silently. So is
a gold answer with no word in it (blank, or only punctuation: only an empty ``\\boxed{}`` could match
it), a line that is not UTF-8, and a file without rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from atpo_jax.rewards.normalize import comparable_answer

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
_MAX_REPORTED = 10


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or has malformed rows."""


@dataclasses.dataclass(frozen=True)
class QARow:
    """One question: where it comes from, its chat-message prompt and its gold answers."""

    data_source: str
    prompt: list[dict[str, str]]
    golds: list[str]
    ability: str = "fact-reasoning"
    extra_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The Search-R1/ATPO record for this row."""
        return {
            "data_source": self.data_source,
            "prompt": [dict(m) for m in self.prompt],
            "ability": self.ability,
            "reward_model": {"style": "rule", "ground_truth": {"target": list(self.golds)}},
            "extra_info": dict(self.extra_info),
        }


_GROUND_TRUTH_SHAPES = (
    "{'target': [answers]} (Search-R1/ATPO), a list of answer strings, or one answer string"
)
# The FlashRAG answer fields, in the order they are looked up (flashrag.py uses the same list).
FLASHRAG_ANSWER_FIELDS = ("golden_answers", "answers", "answer")


class _RowProblem(Exception):
    """Why one record is not a valid row (collected per file by :func:`rows_from_records`)."""


def _ground_truth_golds(reward_model: Any) -> list[str]:
    """The gold answers of ``reward_model.ground_truth``: ``{"target": [...]}`` as the reference
    writes it (``target`` may also be one string), a list of strings, or one string; other
    Search-R1 derivatives write the last two shapes."""
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise _RowProblem(f"reward_model.ground_truth is missing; expected {_GROUND_TRUTH_SHAPES}")
    truth = reward_model["ground_truth"]
    where = "reward_model.ground_truth"
    if isinstance(truth, dict):
        if truth.get("target") is None:
            raise _RowProblem(
                f"{where} is an object without 'target' (keys {sorted(truth)}); "
                f"expected {_GROUND_TRUTH_SHAPES}"
            )
        truth, where = truth["target"], f"{where}.target"
    if isinstance(truth, str):
        truth = [truth]
    if not isinstance(truth, (list, tuple)) or not truth:
        raise _RowProblem(
            f"{where} must be a non-empty list of strings, got {truth!r:.80}; "
            f"expected {_GROUND_TRUTH_SHAPES}"
        )
    if not all(isinstance(t, str) for t in truth):
        raise _RowProblem(f"{where} has a non-string entry: {truth!r:.80}")
    problem = gold_problem(truth)
    if problem:
        raise _RowProblem(f"{where} {problem}")
    return list(truth)


def _parse_record(record: Any) -> QARow:
    """The row of one record; raises :class:`_RowProblem` saying what is wrong with it."""
    if not isinstance(record, dict):
        raise _RowProblem(f"expected an object, got {type(record).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        if "question" in record and any(f in record for f in FLASHRAG_ANSWER_FIELDS):
            raise _RowProblem(
                f"missing {missing}; this looks like FlashRAG JSONL, convert it with "
                "`python -m atpo_jax.data.flashrag --input FILE --output OUT.parquet --data-source NAME`"
            )
        raise _RowProblem(f"missing field(s) {missing}")
    if not isinstance(record["data_source"], str) or not record["data_source"]:
        raise _RowProblem("data_source must be a non-empty string")
    prompt = record["prompt"]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise _RowProblem("prompt must be a non-empty list of {role, content} messages")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _RowProblem(f"prompt message {m!r:.80} has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise _RowProblem(f"prompt message with role {m['role']!r} has no string 'content'")
    golds = _ground_truth_golds(record["reward_model"])
    extra = record.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise _RowProblem("extra_info must be an object")
    return QARow(
        data_source=record["data_source"],
        prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
        golds=golds,
        ability=record.get("ability") or "fact-reasoning",
        extra_info=dict(extra or {}),
    )


def gold_problem(golds: Sequence[str]) -> str | None:
    """Why these gold answers cannot be scored, or None: a gold with no word left after the
    reward's normalisation (blank, or only punctuation) would make an empty ``\\boxed{}`` the
    only possible match, so it is an error in the data rather than a question nobody can answer."""
    for i, gold in enumerate(golds):
        if not comparable_answer(gold):
            return f"entry {i} ({gold!r:.40}) is empty: every gold answer needs a word"
    return None


def rows_from_records(
    records: Sequence[Any], source: str, *, locations: Sequence[str] | None = None
) -> list[QARow]:
    """Validates records and converts them; ``source`` names the file in error messages.

    Args:
      records: the raw records.
      source: file name for messages.
      locations: where each record sits (``"line 7"``); defaults to ``"row i"``, 1-based (the
        first record is row 1).

    Raises:
      DatasetError: listing up to 10 bad rows with their location, and how many there are in total.
    """
    if locations is None:
        locations = [f"row {i}" for i in range(1, len(records) + 1)]
    rows, problems = [], []
    for where, record in zip(locations, records, strict=True):
        try:
            rows.append(_parse_record(record))
        except _RowProblem as e:
            problems.append(f"{source} {where}: {e}")
    if problems:
        shown = "\n  ".join(problems[:_MAX_REPORTED])
        extra = len(problems) - _MAX_REPORTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise DatasetError(f"{len(problems)} malformed row(s):\n  {shown}{more}")
    return rows


def read_rows(path: str | os.PathLike[str]) -> list[QARow]:
    """Reads a ``.parquet`` or ``.jsonl`` dataset of ATPO/Search-R1 rows.

    Errors name the file and the 1-based row number (parquet) or line number (JSONL).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"dataset file {path!r} does not exist")
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {missing}; expected the ATPO/Search-R1 row format "
                "(data_source, prompt, reward_model.ground_truth)"
            )
        wanted = [
            c for c in (*REQUIRED_COLUMNS, "ability", "extra_info") if c in table.column_names
        ]
        return _non_empty(rows_from_records(table.select(wanted).to_pylist(), path), path)
    if path.endswith(".jsonl"):
        records, locations = [], []
        for lineno, line in read_text_lines(path, DatasetError):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path} line {lineno}: not valid JSON ({e})") from None
            locations.append(f"line {lineno}")
        return _non_empty(rows_from_records(records, path, locations=locations), path)
    raise DatasetError(f"{path}: unsupported dataset file type; use .parquet or .jsonl")


def _non_empty(rows: list[QARow], path: str) -> list[QARow]:
    # An empty file would only fail later, as a division by zero in the first training step.
    if not rows:
        raise DatasetError(f"{path} has no rows: a dataset file needs at least one question")
    return rows


def read_text_lines(path: str, error: type[ValueError] = DatasetError) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of a UTF-8 file (a BOM on line 1 is dropped); a line
    that is not UTF-8 raises ``error`` naming the file, line and byte instead of a bare
    ``UnicodeDecodeError``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path} line {lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason}); "
                    "re-encode the file as UTF-8"
                ) from None


def _records_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    reward = pa.struct(
        [("style", pa.string()), ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))]
    )
    columns = {
        "data_source": pa.array([r["data_source"] for r in records], pa.string()),
        "prompt": pa.array([r["prompt"] for r in records], pa.list_(message)),
        "ability": pa.array([r["ability"] for r in records], pa.string()),
        "reward_model": pa.array([r["reward_model"] for r in records], reward),
        # extra_info differs between datasets; pyarrow infers one struct type over all rows.
        "extra_info": pa.array([r["extra_info"] for r in records]),
    }
    return pa.table(columns)


def write_rows(rows: Sequence[QARow], path: str | os.PathLike[str]) -> None:
    """Writes rows as ``.parquet`` (Search-R1 schema) or ``.jsonl``; the same rows give the same bytes."""
    path = os.fspath(path)
    records = [row.to_record() for row in rows]
    if path.endswith(".parquet"):
        if not records:
            raise DatasetError(f"refusing to write an empty dataset to {path}")
        pq.write_table(_records_table(records), path)
    elif path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise DatasetError(f"{path}: unsupported dataset file type; use .parquet or .jsonl")
