"""FAISS inner-product indexes for unit-norm embeddings (cosine similarity = inner product).

Three kinds (``IndexOptions.type``):

* ``flat`` (default, the reference's ``e5_Flat.index``): exact search, ``N x d`` float32 scores
  per query batch. Memory ``4 N d`` bytes (wiki-18, 21M x 768: 65 GB).
* ``ivf``: ``nlist`` k-means cells (trained on a sample of the embeddings); a query scans the
  ``nprobe`` nearest cells. ``nprobe = nlist`` scans every cell and is exact.
* ``hnsw``: a graph index (``hnsw_m`` links per node); ``ef_search`` trades recall for speed.
  Approximate; no training; CPU only.

``faiss-gpu`` is used when it is installed and sees a GPU (flat and ivf; indexes are sharded over
every GPU like the reference's ``index_cpu_to_all_gpus``); ``faiss-cpu`` otherwise. This module
imports no JAX.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import Any

import numpy as np

from atpo_jax.settings import StrEnum

# FAISS's k-means uses at most this many points per centroid (it subsamples beyond it).
MAX_POINTS_PER_CENTROID = 256
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that the clustering is unreliable


class IndexType(StrEnum):
    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """How the FAISS index is built and searched (recorded in the index's manifest).

    Attributes:
      type: ``flat`` | ``ivf`` | ``hnsw`` (module docstring).
      nlist: IVF cells; 0 = ``auto_nlist(N)`` (about ``4 sqrt(N)``, at most ``N / 39``).
      nprobe: IVF cells scanned per query (the default at search time; capped at ``nlist``).
      hnsw_m: HNSW links per node.
      ef_construction: HNSW candidate list size while building.
      ef_search: HNSW candidate list size while searching (>= topk).
    """

    type: IndexType = IndexType.FLAT
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", IndexType.parse(self.type, "index type"))
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ValueError(f"nlist must be >= 0 (0 = automatic), got {self.nlist}")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "type": str(self.type)}


def import_faiss() -> ModuleType:
    """``faiss``, or an ImportError that says which package to install."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "dense retrieval needs FAISS: pip install faiss-cpu (or faiss-gpu on a CUDA machine)"
        ) from e
    return faiss


def auto_nlist(count: int) -> int:
    """IVF cells for ``count`` vectors: ``4 sqrt(count)``, but at least 39 training points each.

    >>> auto_nlist(100_000), auto_nlist(1000), auto_nlist(10)
    (1264, 25, 1)
    """
    return max(1, min(int(4 * math.sqrt(count)), count // MIN_POINTS_PER_CENTROID))


def resolved_nlist(options: IndexOptions, count: int) -> int:
    """The IVF cell count for ``count`` vectors (``options.nlist`` or automatic), at most ``count``."""
    return max(1, min(options.nlist or auto_nlist(count), count))


def new_index(dim: int, options: IndexOptions, count: int) -> Any:
    """An empty inner-product index for ``count`` vectors of ``dim`` (IVF still untrained)."""
    faiss = import_faiss()
    if options.type is IndexType.FLAT:
        return faiss.IndexFlatIP(dim)
    if options.type is IndexType.IVF:
        quantizer = faiss.IndexFlatIP(dim)
        # faiss's Python wrapper keeps the quantizer alive as long as the index (never set
        # own_fields: C++ and Python would both free it).
        return faiss.IndexIVFFlat(
            quantizer, dim, resolved_nlist(options, count), faiss.METRIC_INNER_PRODUCT
        )
    index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options.ef_construction
    return index


def training_rows(options: IndexOptions, count: int, seed: int = 0) -> np.ndarray | None:
    """Sorted row numbers to train an IVF index on (None: no training needed).

    At most 256 points per cell, FAISS's own cap, drawn without replacement with a fixed seed so
    a rebuild trains the same cells.
    """
    if options.type is not IndexType.IVF:
        return None
    wanted = min(count, resolved_nlist(options, count) * MAX_POINTS_PER_CENTROID)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=wanted, replace=False))


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_search_device(index: Any, options: IndexOptions, use_gpu: bool | None) -> tuple[Any, bool]:
    """``(index, on_gpu)``: moved to every GPU (sharded) when asked, or by default (None) when
    faiss-gpu sees one and the type supports it (not hnsw)."""
    supported = options.type is not IndexType.HNSW
    if use_gpu is None:
        use_gpu = supported and gpu_count() > 0
    if not use_gpu:
        return index, False
    if not supported or gpu_count() == 0:
        raise ValueError(
            "a GPU index was asked for, but "
            + ("HNSW indexes are CPU-only" if not supported else "faiss sees no GPU")
            + "; search on the CPU instead"
        )
    faiss = import_faiss()
    cloner = faiss.GpuMultipleClonerOptions()
    cloner.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=cloner), True


def set_search_parameters(index: Any, options: IndexOptions, *, on_gpu: bool) -> None:
    """Applies ``nprobe`` (IVF, capped at nlist) or ``ef_search`` (HNSW) to a loaded index."""
    faiss = import_faiss()
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if options.type is IndexType.IVF:
        # A built index's manifest records the resolved nlist (never 0).
        nprobe = min(options.nprobe, options.nlist) if options.nlist else options.nprobe
        space.set_index_parameter(index, "nprobe", nprobe)
    elif options.type is IndexType.HNSW:
        space.set_index_parameter(index, "efSearch", options.ef_search)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products.

    Args:
      index: a FAISS index holding N vectors.
      queries: [Q, d] float32.
      k: hits per query (at most N).

    Returns:
      ([Q, k] float32 scores, best first; [Q, k] int64 row numbers, -1 where fewer than k were
      found, which IVF with a small nprobe and HNSW can do).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be [Q, {index.d}], got {list(queries.shape)}")
    return index.search(queries, k)
