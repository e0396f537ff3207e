"""A dense index folder: passage embeddings in resumable shards, a FAISS index, a manifest.

Layout of ``INDEX_DIR`` (written by :func:`build_dense_index`, the engine of
``python -m atpo_jax.tools.build_index``)::

    build.json            what the shards were encoded from (encoder hashes, corpus sha256,
                          shard size, dtype); written first, so a rerun knows what it resumes
    shards/00000.npy      float32 [rows, d] embeddings of corpus rows [i * shard_size, ...)
    shards/00000.json     {"start", "end", "rows", "dimension", "sha256"} of that .npy
    index.faiss           the FAISS index over all rows, in corpus order (row i = line i)
    manifest.json         written last: the index is complete and describes itself

A rerun skips every shard whose ``.npy`` matches its ``.json`` (size, shape and sha256) and
re-encodes the rest, so a build killed at any point (or a shard damaged later) costs only the
missing shards. Files are written under a temporary name and renamed into place, so a crash never
leaves a half-written file under a real name. The shards stay after the build: a rerun with
another ``--index`` type rebuilds only the FAISS index (delete ``shards/`` to save the disk).

The manifest names the encoder (path and the sha256 of its config, weights and tokenizer files),
the corpus (path, sha256, count), the dimension, the index type and options, and the encoding
dtype. A retriever checks it against the corpus and encoder it is given (:func:`check_corpus`,
:func:`check_encoder`) and refuses a mismatch with a message naming the file and the fix.

This module imports no JAX: the encoder is any object with ``encode_passages(texts) -> [n, d]``,
``fingerprint()``, ``dimension``, ``dtype_name`` and ``batch_size``
(:class:`atpo_jax.models.text_encoder.TextEncoder`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shlex
import tempfile
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from atpo_jax.tools import faiss_index
from atpo_jax.tools.corpus import read_corpus
from atpo_jax.tools.faiss_index import IndexOptions

logger = logging.getLogger(__name__)

FORMAT = "atpo_jax.dense_index/1"
MANIFEST = "manifest.json"
BUILD = "build.json"
INDEX_FILE = "index.faiss"
SHARDS = "shards"
# Encoder fingerprint fields that decide the embeddings (the path does not: a copy is the same).
ENCODER_IDENTITY = (
    "config_sha256",
    "weights_sha256",
    "tokenizer_sha256",
    "max_length",
    "query_prefix",
    "passage_prefix",
    "pooling",
    "normalize",
)


class IndexBuildError(ValueError):
    """An index folder cannot be built or resumed (it holds another build, or bad arguments)."""


class IndexMismatchError(ValueError):
    """An index does not belong to the corpus or the encoder it is used with, or is incomplete."""


class PassageEncoder(Protocol):
    batch_size: int

    @property
    def dimension(self) -> int: ...

    @property
    def dtype_name(self) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def encode_passages(self, passages: list[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a finished index (see the module docstring)."""

    encoder: dict[str, Any]
    corpus: dict[str, Any]  # path, sha256, count
    dimension: int
    count: int
    index: IndexOptions
    dtype: str
    created: str
    faiss_version: str = ""
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "index": self.index.to_json()}

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: str) -> Manifest:
        if raw.get("format") != FORMAT:
            raise IndexMismatchError(
                f"{source}: format {raw.get('format')!r} is not {FORMAT!r}; rebuild the index "
                "with python -m atpo_jax.tools.build_index"
            )
        try:
            return cls(**{**raw, "index": IndexOptions(**raw["index"])})
        except (TypeError, ValueError, KeyError) as e:
            raise IndexMismatchError(
                f"{source}: malformed manifest ({e}); rebuild the index"
            ) from e


def build_command(encoder: str, corpus: str, out: str) -> str:
    """The shell command that (re)builds ``out`` (quoted for error messages)."""
    return shlex.join(
        [
            "python",
            "-m",
            "atpo_jax.tools.build_index",
            "--encoder",
            encoder,
            "--corpus",
            corpus,
            "--out",
            out,
        ]
    )


def _write_json(path: str, value: Any) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(value, indent=2, sort_keys=True).encode()))


def _write_atomic(path: str, write: Callable[[Any], Any]) -> None:
    """Writes through a temporary file in the same folder, then renames it over ``path``."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_faiss_atomic(faiss: Any, index: Any, path: str) -> None:
    """``faiss.write_index`` (which streams to a file name) under a temporary name, renamed."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- shards


def shard_paths(out: str, shard: int) -> tuple[str, str]:
    base = os.path.join(out, SHARDS, f"{shard:05d}")
    return base + ".npy", base + ".json"


def shard_is_complete(out: str, shard: int, start: int, end: int, dimension: int) -> bool:
    """Whether shard ``shard`` holds rows [start, end) intact (its record, shape and sha256)."""
    npy, record_path = shard_paths(out, shard)
    record = _read_json(record_path)
    expected = {"start": start, "end": end, "rows": end - start, "dimension": dimension}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
        return False
    if not os.path.isfile(npy) or _sha256(npy) != record.get("sha256"):
        return False
    try:
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == (end - start, dimension) and array.dtype == np.float32


def write_shard(out: str, shard: int, start: int, embeddings: np.ndarray) -> None:
    """Writes the shard's ``.npy`` then its ``.json`` (the record marks it complete)."""
    npy, record_path = shard_paths(out, shard)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    _write_atomic(npy, lambda f: np.save(f, embeddings, allow_pickle=False))
    record = {
        "start": start,
        "end": start + len(embeddings),
        "rows": len(embeddings),
        "dimension": int(embeddings.shape[1]),
        "sha256": _sha256(npy),
    }
    _write_json(record_path, record)


def load_shards(out: str, count: int, shard_size: int) -> list[np.ndarray]:
    """Memory-mapped shard arrays in row order."""
    return [
        np.load(shard_paths(out, i)[0], mmap_mode="r")
        for i in range((count + shard_size - 1) // shard_size)
    ]


# ---------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What :func:`build_dense_index` did."""

    manifest: Manifest
    shards_total: int
    shards_encoded: int  # the rest were complete already
    index_rebuilt: bool


def _build_spec(encoder: PassageEncoder, corpus_sha: str, count: int, shard_size: int) -> dict:
    identity = {k: encoder.fingerprint().get(k) for k in ENCODER_IDENTITY}
    return {
        "format": FORMAT,
        "encoder": identity,
        "corpus_sha256": corpus_sha,
        "count": count,
        "shard_size": shard_size,
        "dtype": encoder.dtype_name,
        "dimension": encoder.dimension,
    }


def _check_resumable(out: str, spec: dict) -> None:
    """Refuses to mix shards of two different builds in one folder."""
    path = os.path.join(out, BUILD)
    previous = _read_json(path)
    if previous is None:
        if os.path.isfile(path):  # unreadable: the folder's shards cannot be trusted
            raise IndexBuildError(f"{path} is damaged: delete {out} and build again")
        return
    differs = sorted(k for k in spec if previous.get(k) != spec[k])
    if differs:
        raise IndexBuildError(
            f"{out} holds embeddings of another build (it differs in: {', '.join(differs)}); "
            f"pass a new --out, or delete {out} to start over"
        )


def build_dense_index(
    encoder: PassageEncoder,
    corpus: str,
    out: str,
    *,
    options: IndexOptions | None = None,
    shard_size: int = 100_000,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> BuildReport:
    """Encodes ``corpus`` into ``out`` shard by shard (resuming), then builds the FAISS index.

    Args:
      encoder: the passage encoder (module docstring).
      corpus: the JSONL corpus (``id``, ``contents``); each passage is encoded as
        ``"passage: " + contents``.
      out: the index folder (created if needed).
      options: FAISS index type and options (default: flat).
      shard_size: passages per shard (the unit of resumption).
      progress: show a tqdm progress bar over the passages.
      on_shard_done: called with the shard number after each shard is written (tests use it to
        interrupt a build).

    Returns:
      A :class:`BuildReport`.

    Raises:
      CorpusError: a malformed corpus (names the file and line).
      IndexBuildError: ``out`` holds shards of a different build, or a bad argument.
    """
    if shard_size < 1:
        raise IndexBuildError(f"--shard-size must be >= 1, got {shard_size}")
    options = options or IndexOptions()
    rows, corpus_sha = read_corpus(corpus)
    count, dim = len(rows), encoder.dimension
    if options.type is faiss_index.IndexType.IVF:
        options = dataclasses.replace(options, nlist=faiss_index.resolved_nlist(options, count))
    os.makedirs(os.path.join(out, SHARDS), exist_ok=True)
    _remove_leftovers(out)
    spec = _build_spec(encoder, corpus_sha, count, shard_size)
    _check_resumable(out, spec)
    _write_json(os.path.join(out, BUILD), spec)

    manifest_path = os.path.join(out, MANIFEST)
    previous = _read_json(manifest_path)
    starts = list(range(0, count, shard_size))
    done = [
        shard_is_complete(out, i, s, min(s + shard_size, count), dim) for i, s in enumerate(starts)
    ]
    if (
        all(done)
        and isinstance(previous, dict)
        and previous.get("index") == options.to_json()
        and os.path.isfile(os.path.join(out, INDEX_FILE))
    ):
        logger.info("%s is up to date (%d passages, %s index)", out, count, options.type)
        manifest = Manifest.from_json(previous, manifest_path)
        return BuildReport(manifest, len(starts), 0, index_rebuilt=False)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest is written

    from tqdm import tqdm

    skipped = sum(min(s + shard_size, count) - s for s, ok in zip(starts, done, strict=True) if ok)
    encoded = 0
    chunk = max(1, encoder.batch_size) * 16  # progress granularity; batches sort within a chunk
    with tqdm(
        total=count, initial=skipped, unit="passage", disable=not progress, desc="encoding"
    ) as bar:
        for shard, start in enumerate(starts):
            if done[shard]:
                continue
            end = min(start + shard_size, count)
            texts = [row["contents"] for row in rows[start:end]]
            parts = []
            for i in range(0, len(texts), chunk):
                parts.append(encoder.encode_passages(texts[i : i + chunk]))
                bar.update(len(parts[-1]))
            embeddings = np.concatenate(parts)
            if embeddings.shape != (end - start, dim):
                raise IndexBuildError(
                    f"the encoder returned embeddings of shape {list(embeddings.shape)} for "
                    f"{end - start} passages of dimension {dim}"
                )
            write_shard(out, shard, start, embeddings)
            encoded += 1
            if on_shard_done is not None:
                on_shard_done(shard)

    faiss = faiss_index.import_faiss()
    index = _faiss_from_shards(load_shards(out, count, shard_size), dim, options, count)
    _write_faiss_atomic(faiss, index, os.path.join(out, INDEX_FILE))
    fingerprint = encoder.fingerprint()
    manifest = Manifest(
        encoder=fingerprint,
        corpus={"path": os.path.abspath(corpus), "sha256": corpus_sha, "count": count},
        dimension=dim,
        count=count,
        index=options,
        dtype=encoder.dtype_name,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        faiss_version=getattr(faiss, "__version__", ""),
    )
    _write_json(manifest_path, manifest.to_json())
    return BuildReport(manifest, len(starts), encoded, index_rebuilt=True)


def _remove_leftovers(out: str) -> None:
    """Deletes the temporary files of a build that was killed while writing."""
    for folder in (out, os.path.join(out, SHARDS)):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))


def _faiss_from_shards(
    shards: list[np.ndarray], dim: int, options: IndexOptions, count: int
) -> Any:
    """The FAISS index over the shards' rows in order (IVF trained on a fixed sample first)."""
    index = faiss_index.new_index(dim, options, count)
    sample = faiss_index.training_rows(options, count)
    if sample is not None:
        bounds = np.cumsum([0] + [len(s) for s in shards])
        picked = [
            shards[i][sample[(sample >= bounds[i]) & (sample < bounds[i + 1])] - bounds[i]]
            for i in range(len(shards))
        ]
        index.train(np.ascontiguousarray(np.concatenate(picked), dtype=np.float32))
    for shard in shards:
        index.add(np.ascontiguousarray(shard, dtype=np.float32))
    return index


# ---------------------------------------------------------------------------------------- load


def load_manifest(index_dir: str) -> Manifest:
    """The manifest of a finished index folder, or an :class:`IndexMismatchError` saying why not."""
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isdir(index_dir):
        raise IndexMismatchError(
            f"index folder {index_dir!r} does not exist: build it with python -m "
            "atpo_jax.tools.build_index --encoder DIR --corpus corpus.jsonl --out " + index_dir
        )
    if not os.path.isfile(path):
        started = os.path.isfile(os.path.join(index_dir, BUILD))
        raise IndexMismatchError(
            f"{path} not found: "
            + (
                "the index build did not finish; rerun the same build_index command to resume it"
                if started
                else "this is not a dense index folder (build one with python -m "
                "atpo_jax.tools.build_index)"
            )
        )
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise IndexMismatchError(f"{path} is not a JSON object; rebuild the index")
    return Manifest.from_json(raw, path)


def read_faiss_index(index_dir: str, manifest: Manifest) -> Any:
    """``index.faiss``, checked against the manifest's count and dimension."""
    path = os.path.join(index_dir, INDEX_FILE)
    faiss = faiss_index.import_faiss()
    if not os.path.isfile(path):
        raise IndexMismatchError(f"{path} is missing; rerun build_index on {index_dir}")
    index = faiss.read_index(path)
    if index.ntotal != manifest.count or index.d != manifest.dimension:
        raise IndexMismatchError(
            f"{path} holds {index.ntotal} vectors of dimension {index.d} but "
            f"{os.path.join(index_dir, MANIFEST)} says {manifest.count} x {manifest.dimension}; "
            "rebuild the index"
        )
    return index


def check_corpus(index_dir: str, manifest: Manifest, corpus: str, sha256: str, count: int) -> None:
    """Refuses a corpus other than the one the index was built from (by content, not path)."""
    built = manifest.corpus
    if sha256 == built.get("sha256") and count == manifest.count:
        return
    raise IndexMismatchError(
        f"{os.path.join(index_dir, MANIFEST)}: the index was built from {built.get('path')} "
        f"(sha256 {str(built.get('sha256'))[:12]}..., {manifest.count} passages) but the corpus "
        f"{corpus} has sha256 {sha256[:12]}... ({count} passages). Rebuild the index for this "
        f"corpus: {build_command(manifest.encoder.get('path', 'ENCODER_DIR'), corpus, index_dir)}"
        " (or use the corpus it was built from)"
    )


def check_encoder(index_dir: str, manifest: Manifest, fingerprint: dict[str, Any]) -> None:
    """Refuses an encoder whose checkpoint, tokenizer or text conventions differ from the index's."""
    differs = [k for k in ENCODER_IDENTITY if manifest.encoder.get(k) != fingerprint.get(k)]
    if not differs:
        return
    raise IndexMismatchError(
        f"{os.path.join(index_dir, MANIFEST)}: the index was encoded with "
        f"{manifest.encoder.get('path')}, but the encoder {fingerprint.get('path')} differs in "
        f"{', '.join(differs)}. Use the encoder the index was built with, or rebuild the index: "
        f"{build_command(str(fingerprint.get('path')), manifest.corpus.get('path', 'CORPUS'), index_dir)}"
    )
