"""e5 text encoder: tokenizer + :class:`~atpo_jax.models.bert.BertEncoder`, batched and bucketed.

    encoder = TextEncoder.from_pretrained("/ckpt/e5-base-v2", dtype="bfloat16")
    q = encoder.encode_queries(["who wrote hamlet"])           # [1, 768] float32, unit rows
    p = encoder.encode_passages(['"Hamlet"\\nHamlet is ...'])  # "passage: " prefix added

The e5 conventions (ALGORITHM.md §6.1): ``query: `` / ``passage: `` prefixes, truncation to
``max_length`` tokens (256 in the reference server), mean pooling, L2 normalisation.

Texts are tokenized once, sorted by length (so a batch pads to its own longest text, not the
longest in the call), and run in batches whose shapes come from a small set of buckets: lengths
16, 32, 64, ... up to ``max_length``, batch sizes 1, 2, 4, ... up to the batch size. A process
compiles at most (#length buckets x #batch buckets) programs, however the texts vary. Results
come back in the caller's order. Safe to call from several threads (the tokenizer, whose Rust
backend refuses concurrent reconfiguration, runs under a lock; jitted calls are thread-safe).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax.models.bert import CONFIG_NAME, DTYPES, BertEncoder, load_bert, weight_files
from atpo_jax.models.tokenizer import load_tokenizer

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
DEFAULT_MAX_LENGTH = 256  # the reference server's query limit and Search-R1's index builder's
_MIN_BUCKET = 16
# Files whose bytes decide how a text is tokenized (whichever the directory has).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def sha256_file(path: str) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Sequence[str]) -> str:
    """SHA-256 over ``name:sha256`` lines of ``paths`` in order (one digest for a file set)."""
    lines = "".join(f"{os.path.basename(p)}:{sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def buckets(limit: int, start: int) -> list[int]:
    """``start, 2*start, 4*start, ...`` below ``limit``, then ``limit`` itself.

    >>> buckets(100, 16)
    [16, 32, 64, 100]
    """
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket >= n (``n`` never exceeds the last bucket)."""
    return next(s for s in sizes if s >= n)


def resolve_dtype(dtype: Any) -> Any:
    """``"float32"``/``"bfloat16"``/``"float16"`` or a dtype -> the JAX dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L] ids and mask -> [B, H] pooled unit embeddings. Module-level and keyed on the
    (hashable) graph definition, so encoders of one architecture share compiled programs."""
    return nnx.merge(graphdef, state)(ids, mask)


class TextEncoder:
    """Embeds texts with an e5-style bi-encoder; see the module docstring.

    Args:
      model: the BERT encoder.
      tokenizer: its ``transformers`` tokenizer.
      max_length: tokens per text after truncation (prefix included), at most the model's
        ``max_position_embeddings``.
      batch_size: texts per forward pass (the largest batch bucket).
      source: the checkpoint directory, recorded in :meth:`fingerprint`.
    """

    def __init__(
        self,
        model: BertEncoder,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 64,
        source: str | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (CLS and SEP), got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = model.config
        self.max_length = min(max_length, self.config.max_position_embeddings)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.source = source
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else self.config.pad_token_id
        )
        self.length_buckets = buckets(self.max_length, min(_MIN_BUCKET, self.max_length))
        self._tokenizer_lock = threading.Lock()
        self._fingerprint: dict[str, Any] | None = None
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: Any = "float32",
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 64,
    ) -> TextEncoder:
        """The encoder and tokenizer of a local Hugging Face checkpoint directory."""
        directory = os.fspath(path)
        model = load_bert(directory, resolve_dtype(dtype))
        tokenizer = load_tokenizer(directory)
        return cls(
            model,
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
            source=os.path.abspath(directory),
        )

    @property
    def dimension(self) -> int:
        return self.config.hidden_size

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.config.dtype).name

    def fingerprint(self) -> dict[str, Any]:
        """What decides the embeddings: checkpoint hashes, truncation, prefixes, pooling.

        An index records it (``manifest.json``); a retriever refuses an encoder whose fingerprint
        differs from the index's (paths may differ: a checkpoint can be copied elsewhere).
        """
        if self._fingerprint is None:
            if self.source is None:
                raise ValueError("fingerprint() needs the checkpoint directory (source=...)")
            tokenizer_files = [
                os.path.join(self.source, name)
                for name in _TOKENIZER_FILES
                if os.path.isfile(os.path.join(self.source, name))
            ]
            self._fingerprint = {
                "path": self.source,
                "config_sha256": sha256_file(os.path.join(self.source, CONFIG_NAME)),
                "weights_sha256": sha256_files(weight_files(self.source)),
                "tokenizer_sha256": sha256_files(tokenizer_files),
                "max_length": self.max_length,
                "query_prefix": QUERY_PREFIX,
                "passage_prefix": PASSAGE_PREFIX,
                "pooling": "mean",
                "normalize": True,
            }
        return dict(self._fingerprint)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (CLS ... SEP), truncated to ``max_length``."""
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                list(texts),
                truncation=True,
                max_length=self.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        return encoded["input_ids"]

    def encode(
        self, texts: Sequence[str], *, prefix: str = "", batch_size: int | None = None
    ) -> np.ndarray:
        """``[N, H]`` float32 unit-norm embeddings of ``prefix + text`` for each text, in order.

        ``batch_size`` (default: the encoder's) caps the texts per forward pass.
        """
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        cap = batch_size or self.batch_size
        batch_buckets = buckets(cap, 1)
        ids = self.tokenize([prefix + t for t in texts])
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first
        out = np.empty((len(ids), self.dimension), np.float32)
        for start in range(0, len(order), cap):
            rows = order[start : start + cap]
            length = bucket_for(max(len(ids[i]) for i in rows), self.length_buckets)
            batch = bucket_for(len(rows), batch_buckets)
            tokens = np.full((batch, length), self.pad_id, np.int32)
            mask = np.zeros((batch, length), np.int32)
            for j, i in enumerate(rows):
                tokens[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = 1
            embedded = _embed(self._graphdef, self._state, tokens, mask)
            out[rows] = np.asarray(embedded)[: len(rows)]
        return out

    def encode_queries(
        self, queries: Sequence[str], *, batch_size: int | None = None
    ) -> np.ndarray:
        """Embeddings of ``"query: " + q``."""
        return self.encode(queries, prefix=QUERY_PREFIX, batch_size=batch_size)

    def encode_passages(
        self, passages: Sequence[str], *, batch_size: int | None = None
    ) -> np.ndarray:
        """Embeddings of ``"passage: " + p``."""
        return self.encode(passages, prefix=PASSAGE_PREFIX, batch_size=batch_size)
