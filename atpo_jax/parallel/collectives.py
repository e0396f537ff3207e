"""Multi-process (multi-host) runs: ``jax.distributed`` start-up and the host-side collectives.

One SPMD program spans every process (DESIGN.md §8): training runs as global programs over the
mesh of all devices, while each process rolls out and calls tools for its own prompts on its own
devices. This module holds the parts that are about processes rather than arrays:

- :func:`initialize` starts ``jax.distributed`` from explicit settings (``launch.py`` flags), the
  environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or the
  cluster (TPU pods, SLURM and Open MPI are detected by JAX itself); a run with none of these stays
  a plain single-process run.
- :func:`local_prompt_positions`: which of a step's prompts this process rolls out. Each
  mini-batch is split into equal contiguous shares, one per process (the block of rows its
  devices hold, ``sharding.process_batch_block``), so a global mini-batch assembled from the
  processes' rows holds the same rows, in the same order, as a single-process run.
- :func:`allgather_concat` and :func:`allgather_objects` gather per-process host values (step
  metrics, evaluation results) in process order (identity functions on one process).

Every function that communicates is a collective: all processes must call it in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

DISTRIBUTED_MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run.

    Attributes:
      mode: ``auto`` (join when a coordinator/process count is given or a multi-process SLURM,
        Open MPI or TPU-pod environment is detected), ``on`` (always call
        ``jax.distributed.initialize``; JAX fills in what is not given from the cluster) or
        ``off`` (single process).
      coordinator_address: ``host:port`` of process 0 ("" = from the cluster).
      num_processes: total processes (0 = from the cluster).
      process_id: this process's rank (-1 = from the cluster).
      local_device_ids: comma-separated devices this process uses ("" = JAX's default: all local
        devices; one GPU per process under SLURM/Open MPI).
      initialization_timeout_s: how long to wait for every process to connect.
    """

    mode: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: str = ""
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.mode not in DISTRIBUTED_MODES:
            raise ValueError(
                f"--distributed={self.mode!r} is not one of {', '.join(DISTRIBUTED_MODES)}"
            )
        if self.num_processes < 0:
            raise ValueError(f"--num_processes must be >= 0, got {self.num_processes}")
        if self.num_processes and not -1 <= self.process_id < self.num_processes:
            raise ValueError(
                f"--process_id={self.process_id} must be in [0, --num_processes="
                f"{self.num_processes})"
            )


def settings_from(
    values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> DistributedSettings:
    """Settings from explicit ``values`` (e.g. launch flags; None/""/0/-1 = not given), then the
    environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
    ``JAX_LOCAL_DEVICE_IDS``."""
    values = {k: v for k, v in dict(values or {}).items() if v not in (None, "", -1)}
    env = os.environ if env is None else env
    if not values.get("num_processes"):
        values.pop("num_processes", None)
    from_env = {
        "coordinator_address": env.get(ENV_COORDINATOR, ""),
        "num_processes": env.get(ENV_NUM_PROCESSES, ""),
        "process_id": env.get(ENV_PROCESS_ID, ""),
        "local_device_ids": env.get(ENV_LOCAL_DEVICE_IDS, ""),
    }
    for key, raw in from_env.items():
        if key in values or raw == "":
            continue
        if key in ("num_processes", "process_id"):
            try:
                values[key] = int(raw)
            except ValueError:
                name = ENV_NUM_PROCESSES if key == "num_processes" else ENV_PROCESS_ID
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
        else:
            values[key] = raw
    return DistributedSettings(**values)


def _cluster_detected(env: Mapping[str, str]) -> str | None:
    """The multi-process launcher this process runs under, if any (what JAX can auto-detect)."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu pod"
    return None


def initialize(
    settings: DistributedSettings | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Starts ``jax.distributed`` when this is a multi-process run; returns whether it did.

    Call it first thing, before any JAX computation (``launch.py`` does). ``settings`` may be a
    :class:`DistributedSettings`, a mapping of its fields (missing ones come from the environment,
    see :func:`settings_from`), or None (environment and cluster detection only).
    """
    env = os.environ if env is None else env
    if not isinstance(settings, DistributedSettings):
        settings = settings_from(settings, env)
    if settings.mode == "off":
        return False
    explicit = bool(settings.coordinator_address or settings.num_processes)
    cluster = _cluster_detected(env)
    if settings.mode == "auto" and not explicit and cluster is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {"initialization_timeout": settings.initialization_timeout_s}
    if settings.coordinator_address:
        kwargs["coordinator_address"] = settings.coordinator_address
    if settings.num_processes:
        kwargs["num_processes"] = settings.num_processes
    if settings.process_id >= 0:
        kwargs["process_id"] = settings.process_id
    if settings.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in settings.local_device_ids.split(",")]
    log.info("jax.distributed.initialize(%s) [%s]", kwargs, cluster or "explicit settings")
    jax.distributed.initialize(**kwargs)
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# --------------------------------------------------------------------------------------------
# Who does what


def is_main_process() -> bool:
    return jax.process_index() == 0


def local_prompt_positions(
    prompts_per_step: int, mini_batch_prompts: int, block: int, blocks: int
) -> list[int]:
    """Positions (within the step's prompts) that the process holding batch block ``block`` of
    ``blocks`` rolls out: share ``block`` of every mini-batch, mini-batches in order.

    With one block this is ``range(prompts_per_step)``.
    """
    if mini_batch_prompts % blocks:
        raise ValueError(
            f"train.mini_batch_prompts={mini_batch_prompts} must be divisible by the number of "
            f"processes holding batch rows ({blocks}): each process rolls out an equal share of "
            "every mini-batch"
        )
    share = mini_batch_prompts // blocks
    return [
        start + block * share + j
        for start in range(0, prompts_per_step, mini_batch_prompts)
        for j in range(share)
    ]


def split_evenly(count: int, block: int, blocks: int) -> range:
    """Indices of block ``block`` when ``count`` items are split into ``blocks`` contiguous,
    near-equal parts (evaluation questions)."""
    bounds = np.linspace(0, count, blocks + 1).round().astype(int)
    return range(int(bounds[block]), int(bounds[block + 1]))


# --------------------------------------------------------------------------------------------
# Host-side collectives


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _allgather(x: np.ndarray) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def allgather_concat(x: np.ndarray, position: int | None = None) -> np.ndarray:
    """Every process's ``x`` (leading dimensions may differ) concatenated along axis 0, ordered by
    ``position`` (default: process index). The input itself on one process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    position = jax.process_index() if position is None else position
    sizes = _allgather(np.asarray([position, x.shape[0]], np.int64))
    longest = int(sizes[:, 1].max())
    padded = np.zeros((longest, *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    gathered = _allgather(padded)
    parts = {int(p): gathered[i, : int(n)] for i, (p, n) in enumerate(sizes)}
    return np.concatenate([parts[p] for p in sorted(parts)], axis=0)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable ``obj``, in process order (``[obj]`` on one process)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    return [json.loads(bytes(part).decode()) for part in _split_rows(data)]


def _split_rows(data: np.ndarray) -> list[np.ndarray]:
    lengths = _allgather(np.asarray([data.size], np.int64))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = _allgather(padded)
    return [gathered[i, : int(n)] for i, n in enumerate(lengths)]


def main_process_first(fn: Any, name: str) -> Any:
    """``fn()`` on process 0, then on the others (e.g. building files the others then read)."""
    if not is_main_process():
        barrier(name)
    result = fn()
    if is_main_process():
        barrier(name)
    return result
