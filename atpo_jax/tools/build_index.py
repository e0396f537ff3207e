"""Builds a dense (e5 + FAISS) index over a JSONL corpus for the dense retriever.

    python -m atpo_jax.tools.build_index --encoder /ckpt/e5-base-v2 \\
        --corpus /data/wiki-18.jsonl --out /data/wiki18-e5 \\
        [--index flat|ivf|hnsw] [--batch-size 256] [--shard-size 100000] \\
        [--dtype float32|bfloat16] [--max-length 256] [--nlist N] [--nprobe N] [--hnsw-m M]

Passages are encoded as ``"passage: " + contents`` in shards of ``--shard-size`` rows; a rerun
of the same command resumes after the last complete shard (a damaged shard is re-encoded), and
a rerun with another ``--index`` reuses the embeddings. The folder layout and the manifest are
described in :mod:`atpo_jax.tools.dense_index`. The encoder runs on JAX's default device
(``--dtype bfloat16`` on a GPU/TPU roughly halves the time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from atpo_jax.tools.corpus import CorpusError
from atpo_jax.tools.dense_index import IndexBuildError, build_dense_index
from atpo_jax.tools.faiss_index import IndexOptions, IndexType


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = IndexOptions()
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.tools.build_index",
        description="Encode a JSONL corpus with an e5 encoder and build a FAISS index.",
    )
    parser.add_argument("--encoder", required=True, help="encoder checkpoint dir (HF layout)")
    parser.add_argument("--corpus", required=True, help="JSONL corpus, one {id, contents} a line")
    parser.add_argument("--out", required=True, help="index folder (created; resumed if present)")
    parser.add_argument(
        "--index", default="flat", choices=[t.value for t in IndexType], help="FAISS index type"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="passages per forward pass")
    parser.add_argument("--shard-size", type=int, default=100_000, help="passages per shard")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="encoder dtype"
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per passage")
    parser.add_argument("--nlist", type=int, default=0, help="IVF cells (0: about 4 sqrt(N))")
    parser.add_argument(
        "--nprobe", type=int, default=defaults.nprobe, help="IVF cells scanned per query"
    )
    parser.add_argument("--hnsw-m", type=int, default=defaults.hnsw_m, help="HNSW links per node")
    parser.add_argument(
        "--ef-search", type=int, default=defaults.ef_search, help="HNSW search list size"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.path.isdir(args.encoder):
        sys.exit(f"build_index: --encoder {args.encoder!r} is not a directory")
    for name in ("batch_size", "shard_size", "max_length"):
        if getattr(args, name) < 1:
            sys.exit(f"build_index: --{name.replace('_', '-')} must be >= 1")
    try:
        options = IndexOptions(
            type=args.index,
            nlist=args.nlist,
            nprobe=args.nprobe,
            hnsw_m=args.hnsw_m,
            ef_search=args.ef_search,
        )
        # Imported after the arguments are checked: loading JAX takes seconds.
        from atpo_jax.models.text_encoder import TextEncoder

        encoder = TextEncoder.from_pretrained(
            args.encoder, dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size
        )
        start = time.perf_counter()
        report = build_dense_index(
            encoder,
            args.corpus,
            args.out,
            options=options,
            shard_size=args.shard_size,
            progress=not args.no_progress,
        )
    except (CorpusError, IndexBuildError, ValueError, ImportError) as e:
        sys.exit(f"build_index: {e}")
    m = report.manifest
    print(
        f"{args.out}: {m.count} passages, dimension {m.dimension}, {m.index.type} index; "
        f"{report.shards_encoded} of {report.shards_total} shards encoded now"
        + ("" if report.index_rebuilt else " (already up to date)")
        + f", {time.perf_counter() - start:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
