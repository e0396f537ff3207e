"""Datasets, prompts and the synthetic multi-hop world (no JAX needed).

* :mod:`.rows`: ATPO/Search-R1 rows from parquet/JSONL (:func:`read_rows`, :func:`write_rows`).
* :mod:`.flashrag`: FlashRAG JSONL -> rows (``python -m atpo_jax.data.flashrag``).
* :mod:`.benchmarks`, :mod:`.build_benchmarks`: the paper's seven benchmarks and their train/test
  files (``python -m atpo_jax.data.build_benchmarks``).
* :mod:`.prompts`: the paper's instruction and a short one, rendered through a chat template.
* :mod:`.transcripts`: (text, trainable) segments and their token encoding for supervised warm starts.
* :mod:`.synthetic`: the offline multi-hop world the default config trains on.
"""

from atpo_jax.data.flashrag import convert_flashrag, convert_flashrag_records, read_flashrag_jsonl
from atpo_jax.data.prompts import (
    PAPER_INSTRUCTION,
    PROMPT_STYLES,
    SHORT_INSTRUCTION,
    build_messages,
    encode_prompt,
    normalize_question,
    render_prompt,
)
from atpo_jax.data.rows import DatasetError, QARow, read_rows, rows_from_records, write_rows
from atpo_jax.data.transcripts import EncodedTranscript, Segment, encode_transcript, response_text

__all__ = [
    "PAPER_INSTRUCTION",
    "PROMPT_STYLES",
    "SHORT_INSTRUCTION",
    "DatasetError",
    "EncodedTranscript",
    "QARow",
    "Segment",
    "build_messages",
    "convert_flashrag",
    "convert_flashrag_records",
    "encode_prompt",
    "encode_transcript",
    "normalize_question",
    "read_flashrag_jsonl",
    "read_rows",
    "render_prompt",
    "response_text",
    "rows_from_records",
    "write_rows",
]
