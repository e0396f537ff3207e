"""Reading a retrieval corpus: JSONL, one object per line with a string ``id`` and ``contents``.

This is the wiki-18 layout the Search-R1/ATPO retrieval service serves (ALGORITHM.md §6.1). Rows keep any
extra fields, because the retrieval server echoes the whole row back.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


class CorpusError(ValueError):
    """The corpus file is missing or has a malformed line."""


def read_corpus(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], str]:
    """Reads a JSONL corpus and returns ``(rows, sha256_of_the_file_bytes)``.

    The hash is computed from the same bytes that were parsed, so an index cached under it can never be
    paired with a different corpus.

    Raises:
      CorpusError: the file is missing, empty, or a line is not a JSON object with string ``id`` and
        ``contents`` (the message names the file and line number).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorpusError(
            f"corpus file {path!r} does not exist; pass a JSONL file with one "
            '{"id": ..., "contents": ...} object per line'
        )
    digest = hashlib.sha256()
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            line = raw.strip()
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
            if "id" not in row:
                raise CorpusError(f"{path} line {lineno}: missing field 'id'")
            rows.append(row)
    if not rows:
        raise CorpusError(f"corpus file {path!r} has no rows")
    return rows, digest.hexdigest()


def write_corpus(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Writes rows as JSONL (UTF-8, keys in insertion order, ``\\n`` line ends) deterministically."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
