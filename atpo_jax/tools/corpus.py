"""Reading a retrieval corpus: JSONL, one object per line with a string ``id`` and ``contents``.

This is the wiki-18 layout the Search-R1/ATPO retrieval service serves (ALGORITHM.md §6.1). Rows keep any
extra fields, because the retrieval server echoes the whole row back.

Validation (every rule names the file and the line): each line is UTF-8 JSON, an object with a
string ``contents`` and an ``id`` that is a non-empty string or an integer, unique over the file
(``"7"`` and ``7`` are the same id: the service returns ids as text). A passage whose contents are
empty or blank is kept (line numbers and ids stay as they are) but counted in one warning naming
the first few lines; a corpus where every passage is empty is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

_MAX_REPORTED = 5


class CorpusError(ValueError):
    """The corpus file is missing or has a malformed line."""


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_REPORTED])
    more = f" and {len(numbers) - _MAX_REPORTED} more" if len(numbers) > _MAX_REPORTED else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _id_problem(row: dict[str, Any]) -> str | None:
    """Why the row's ``id`` cannot name a passage, or None."""
    if "id" not in row:
        return "missing field 'id'"
    doc_id = row["id"]
    if doc_id is None:
        return "'id' is null: every passage needs an id"
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return f"'id' must be a string or an integer, got {doc_id!r:.40}"
    if isinstance(doc_id, str) and not doc_id.strip():
        return "'id' is empty: every passage needs an id"
    return None


def read_corpus(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], str]:
    """Reads a JSONL corpus and returns ``(rows, sha256_of_the_file_bytes)``.

    The hash is computed from the same bytes that were parsed, so an index cached under it can never be
    paired with a different corpus.

    Raises:
      CorpusError: the file is missing or empty, a line is not UTF-8 JSON, not an object with a
        string ``contents`` and a valid ``id``, ids repeat, or every passage is empty (the message
        names the file and line numbers).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorpusError(
            f"corpus file {path!r} does not exist; pass a JSONL file with one "
            '{"id": ..., "contents": ...} object per line'
        )
    digest = hashlib.sha256()
    rows: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}  # id (as text) -> the line it first appeared on
    duplicates: dict[str, list[int]] = {}
    empty: list[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                # Decoded here so that bad bytes name their line (json.loads would raise a bare
                # UnicodeDecodeError); utf-8-sig drops a byte-order mark, which json.loads allowed.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path} line {lineno}: not UTF-8 text (byte {e.start} of the line: "
                    f"{e.reason}); re-encode the corpus as UTF-8"
                ) from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path} line {lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path} line {lineno}: expected a JSON object, got {row!r:.100}")
            if not isinstance(row.get("contents"), str):
                raise CorpusError(f"{path} line {lineno}: missing string field 'contents'")
            problem = _id_problem(row)
            if problem:
                raise CorpusError(f"{path} line {lineno}: {problem}")
            key = str(row["id"])
            if key in first_line:
                duplicates.setdefault(key, [first_line[key]]).append(lineno)
            else:
                first_line[key] = lineno
            if not row["contents"].strip():
                empty.append(lineno)
            rows.append(row)
    if not rows:
        raise CorpusError(f"corpus file {path!r} has no rows")
    if duplicates:
        # A search result names its passage by id, so two passages with one id are ambiguous.
        shown = "; ".join(
            f"id {key!r} on {_lines(lines)}" for key, lines in list(duplicates.items())[:3]
        )
        more = f" (and {len(duplicates) - 3} more ids)" if len(duplicates) > 3 else ""
        raise CorpusError(
            f"{path}: {len(duplicates)} duplicate passage id(s): {shown}{more}; ids must be unique"
        )
    if len(empty) == len(rows):
        raise CorpusError(f"{path}: all {len(rows)} passages have empty 'contents'")
    if empty:
        logger.warning(
            "%s: %d of %d passages have empty 'contents' (%s); they are kept but never match a "
            "search",
            path,
            len(empty),
            len(rows),
            _lines(empty),
        )
    return rows, digest.hexdigest()


def write_corpus(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Writes rows as JSONL (UTF-8, keys in insertion order, ``\\n`` line ends) deterministically."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
