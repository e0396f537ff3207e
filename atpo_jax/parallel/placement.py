"""Placing arrays on a mesh: batches split over the batch axes, replicated values, resharding
between meshes, and which rows of a batch each process holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atpo_jax.parallel.mesh import BATCH_AXES, batch_parallelism
from atpo_jax.parallel.rules import param_shardings, path_str


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh (scalars, PRNG keys, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (row) axis split over ``data`` x ``fsdp``; other axes and ``tensor`` replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this process's rows: every leaf [rows, ...] split by ``batch_sharding``.

    In a multi-host run each process passes its own rows (the same count everywhere) and gets
    the global array of all processes' rows. Raises ``ValueError`` naming the leaf when the
    global row count is not divisible by ``data * fsdp``.
    """
    sharding = batch_sharding(mesh)
    ways = batch_parallelism(mesh)

    def place_rows(path: Any, leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        rows = (leaf.shape[0] if leaf.ndim else 0) * jax.process_count()
        if leaf.ndim == 0 or rows % ways:
            raise ValueError(
                f"batch leaf {path_str(path) or '<root>'} has {rows} rows (shape "
                f"{list(leaf.shape)} x {jax.process_count()} process(es)), not divisible by "
                f"data*fsdp = {ways}"
            )
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map_with_path(place_rows, batch)


def shard_params(tree: Any, mesh: Mesh, *, strict: bool = False) -> Any:
    """``tree`` (parameters or optimizer state) placed by its declared logical axes."""
    return jax.device_put(tree, param_shardings(mesh, tree, strict=strict))


def reshard(tree: Any, shardings: Any) -> Any:
    """``tree`` (global arrays) moved to ``shardings`` by one jitted identity: works across hosts,
    where ``jax.device_put`` between meshes may not."""
    return jax.jit(lambda x: x, out_shardings=shardings)(tree)


def place(tree: Any, shardings: Any) -> Any:
    """Global arrays in ``shardings`` from values that every process holds in full (the same on
    every host, e.g. a model built from the same seed): each process fills only its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(leaf: Any, target: jax.sharding.Sharding) -> jax.Array:
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(one, tree, shardings)


def host_local_copy(tree: Any, mesh: Mesh, local_mesh: Mesh) -> Any:
    """Process-local arrays on ``local_mesh`` (this host's devices) holding the full values of the
    global arrays ``tree`` on ``mesh``, sharded over ``local_mesh`` by the declared axes.

    Multi-host rollouts use it: each host runs its own engine programs on its own devices, so it
    needs the whole policy there. The values are first replicated over ``mesh`` (one collective
    all-gather; a transient full copy per device), then each host re-lays out its copy locally.
    On a single process it is a plain reshard onto ``local_mesh``.
    """
    if jax.process_count() == 1:
        return reshard(tree, param_shardings(local_mesh, tree))
    full = reshard(tree, jax.tree.map(lambda _: replicated(mesh), tree))
    local = jax.tree.map(lambda x: x.addressable_data(0), full)
    return jax.device_put(local, param_shardings(local_mesh, local))


def gather_to_host(tree: Any, mesh: Mesh) -> Any:
    """Every process's full copy of the global arrays ``tree`` as process-local arrays (a
    collective in a multi-process run: all processes must call it)."""
    if jax.process_count() == 1:
        return tree
    full = reshard(tree, jax.tree.map(lambda _: replicated(mesh), tree))
    return jax.tree.map(lambda x: x.addressable_data(0), full)


def process_batch_block(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process holds block ``index`` of ``count`` equal contiguous blocks of
    every batch's rows under ``batch_sharding(mesh)``.

    Multi-host training builds each mini-batch from per-process rows, so each process rolls out
    the prompts of its own block. Raises ``ValueError`` when processes do not own distinct
    contiguous blocks (e.g. a ``tensor`` axis spanning hosts while ``data * fsdp`` does not).
    """
    rows = batch_parallelism(mesh)
    spans: dict[int, set[tuple[int, int]]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((rows,)).items():
        start, stop, _ = index[0].indices(rows)
        spans.setdefault(device.process_index, set()).add((start, stop))
    blocks = {}
    for process, ranges in spans.items():
        ordered = sorted(ranges)
        if any(a[1] != b[0] for a, b in zip(ordered, ordered[1:], strict=False)):
            raise ValueError(f"process {process} holds non-contiguous batch rows {ordered}")
        blocks[process] = (ordered[0][0], ordered[-1][1])
    tiling = sorted(blocks.values())
    sizes = {stop - start for start, stop in tiling}
    tiles = all(a[1] == b[0] for a, b in zip(tiling, tiling[1:], strict=False))
    if len(sizes) != 1 or not tiles or tiling[0][0] != 0 or tiling[-1][1] != rows:
        raise ValueError(
            "every process must hold its own, equally sized block of each batch (mesh.data x "
            f"mesh.fsdp must span the {jax.process_count()} processes): got row blocks "
            f"{blocks} of {rows}. Keep the tensor axis inside a host (mesh.tensor <= devices "
            "per host)."
        )
    size = sizes.pop()
    return blocks[jax.process_index()][0] // size, rows // size


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: the training mesh over every device of every process, the
    rollout mesh over this process's devices, the parameters' shardings, and this process's
    block of every batch's rows.

    Attributes:
      mesh: all devices of all processes.
      train_mesh: ``mesh``, or None on a single device (programs are then jitted exactly as
        without a mesh, and stay as fast).
      rollout_mesh: the devices this process's engines run on (each process rolls out its own
        prompts): ``mesh`` on one process, its local part otherwise.
      param_shardings: the parameters' shardings on ``mesh`` (from their declared axes).
      batch_block, batch_blocks: this process holds block ``batch_block`` of ``batch_blocks``
        equal contiguous blocks of every batch's rows.
    """

    mesh: Mesh
    train_mesh: Mesh | None
    rollout_mesh: Mesh
    param_shardings: Any
    batch_block: int
    batch_blocks: int

    @classmethod
    def create(cls, mesh: Mesh, params: Any) -> Placement:
        """The placement of ``params`` (concrete or abstract) on ``mesh``."""
        block, blocks = process_batch_block(mesh)
        return cls(
            mesh=mesh,
            train_mesh=mesh if mesh.size > 1 else None,
            rollout_mesh=mesh if jax.process_count() == 1 else mesh.local_mesh,
            param_shardings=param_shardings(mesh, params),
            batch_block=block,
            batch_blocks=blocks,
        )

    def place(self, params: Any) -> Any:
        """``params`` (the same full values on every process) in the parameter shardings."""
        return place(params, self.param_shardings)

    def canonical(self, params: Any) -> Any:
        """``params`` back in the parameter shardings (after a program that chose its own)."""
        return params if self.train_mesh is None else reshard(params, self.param_shardings)

    def state_shardings(self, tree: Any) -> Any:
        """Shardings of a tree laid out like the parameters (optimizer state), on the mesh."""
        return param_shardings(self.mesh, tree)

    def for_rollout(self, params: Any) -> Any:
        """``params`` where this process's engines can use them: the global arrays themselves on
        one process; a full copy on this process's devices in a multi-process run (a collective)."""
        if jax.process_count() == 1:
            return params
        return host_local_copy(params, self.mesh, self.rollout_mesh)

    def batch(self, rows: Any) -> Any:
        """This process's rows of a mini-batch as global arrays split over the batch axes (the
        rows themselves on a single device)."""
        return rows if self.train_mesh is None else shard_batch(rows, self.mesh)
