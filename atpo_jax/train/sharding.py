"""Device mesh and parameter / optimizer-state / batch shardings (DESIGN.md §8).

One SPMD program runs over a ``jax.sharding.Mesh`` with three axes:

- ``data``: pure data parallelism (parameters replicated across it);
- ``fsdp``: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3);
- ``tensor``: Megatron-style tensor parallelism inside each layer.

Batches are split over ``data`` x ``fsdp`` on their leading (row) axis. Parameters follow
logical-axis rules: every 2-D weight of the decoder has a logical name per dimension, and each
logical name maps to a mesh axis:

| parameter (path suffix)                  | shape  | logical axes     | PartitionSpec        |
|------------------------------------------|--------|------------------|----------------------|
| ``embed_tokens/embedding``               | [V, H] | (vocab, embed)   | (tensor, fsdp)       |
| ``lm_head/kernel``                       | [H, V] | (embed, vocab)   | (fsdp, tensor)       |
| ``{q,k,v}_proj/kernel`` (column-parallel)| [H, ND]| (embed, heads)   | (fsdp, tensor)       |
| ``o_proj/kernel`` (row-parallel)         | [ND, H]| (heads, embed)   | (tensor, fsdp)       |
| ``{gate,up}_proj/kernel`` (column)       | [H, F] | (embed, mlp)     | (fsdp, tensor)       |
| ``down_proj/kernel`` (row-parallel)      | [F, H] | (mlp, embed)     | (tensor, fsdp)       |
| norms, biases (any 1-D / 0-D leaf)       |        |                  | replicated           |

The same rules apply to any pytree whose leaf paths end in those names, which is how optimizer
state (Adam's ``mu``/``nu`` mirror the parameter tree; counters are scalars) gets the parameters'
layout without knowing the optimizer.

Non-divisible dimensions: an array dimension that its mesh axis does not divide evenly (JAX
rejects uneven shardings of stored arrays) is replicated along that axis instead, and one
warning lists every such parameter; ``strict=True`` turns that into a ``ValueError`` naming the
parameter, the dimension and the axis. A 2-D leaf no rule names is replicated with a warning.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from atpo_jax.models import KVCache, init_cache

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter path suffix (keys joined with "/") -> logical name of each dimension.
PARAM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r"o_proj/kernel", ("heads", "embed")),
    (r"(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"down_proj/kernel", ("mlp", "embed")),
)
# Logical dimension name -> mesh axis.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
}
_COMPILED_RULES = tuple(
    (re.compile(rf"(^|/){pattern}(/value)?$"), axes) for pattern, axes in PARAM_RULES
)


# --------------------------------------------------------------------------------------------
# Mesh


def mesh_config(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Mesh axis sizes; one of them may be -1 = "all remaining devices" (default: all FSDP)."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def resolve_mesh_shape(config: Any, num_devices: int, prefix: str = "mesh") -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes for ``num_devices`` devices, with a -1 filled in.

    Raises:
      ValueError: naming ``<prefix>.<axis>`` for a size that is not a positive int or -1, more
        than one -1, a product that does not divide (with a -1) or equal the device count.
    """
    sizes = []
    for axis in MESH_AXES:
        if axis not in config:
            raise ValueError(f"{prefix}.{axis} is missing (mesh axes: {MESH_AXES})")
        size = config[axis]
        if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
            raise ValueError(f"{prefix}.{axis}={size!r} must be a positive integer or -1")
        sizes.append(size)
    settings = ", ".join(f"{prefix}.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(
            f"{settings}: at most one mesh axis may be -1 (the rest); give the others sizes, "
            f"e.g. {prefix}.data=1 with {prefix}.fsdp=-1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"{settings}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices"
            )
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"{settings}: the axes multiply to {known} but there are {num_devices} devices "
            "(set one axis to -1 to use the rest)"
        )
    return tuple(sizes)


def make_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all hosts).

    Devices are laid out with ``mesh_utils.create_device_mesh`` (ICI/NVLink-aware: the last
    axis, ``tensor``, gets the closest devices) and fall back to their listed order. Axes are
    ``AxisType.Auto``: shardings propagate through the model code, which is written without
    sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------
# Parameter and optimizer-state specs


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/0/c" (dict keys, attribute names and indices, "/"-joined)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str, ...] | None:
    """The logical dimension names of a leaf at ``path`` with ``ndim`` dims, or None (replicate).

    Leaves with fewer than 2 dims are always replicated; a >= 2-D leaf gets its rule's names.
    """
    if ndim < 2:
        return None
    for pattern, axes in _COMPILED_RULES:
        if pattern.search(path) and len(axes) == ndim:
            return axes
    return None


def _leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, notes: list[str]) -> PartitionSpec:
    axes = logical_axes(path, len(shape))
    if axes is None:
        if len(shape) >= 2:
            notes.append(f"{path} {list(shape)}: no sharding rule; replicated")
        return PartitionSpec()
    spec = []
    for dim, (size, name) in enumerate(zip(shape, axes, strict=True)):
        mesh_axis = LOGICAL_AXIS_RULES[name]
        if size % mesh.shape[mesh_axis]:
            notes.append(
                f"{path} {list(shape)}: dim {dim} ({name}, size {size}) is not divisible by "
                f"mesh axis {mesh_axis!r} of size {mesh.shape[mesh_axis]}; replicated on it"
            )
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def partition_specs(tree: Any, mesh: Mesh, *, strict: bool = False) -> Any:
    """A ``PartitionSpec`` per array leaf of ``tree`` (params, optimizer state, abstract or not).

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (an ``nnx.State``, a dict, an optax
        state); only leaf paths and shapes are used.
      mesh: a mesh with the ``MESH_AXES`` names.
      strict: raise instead of replicating a dimension that its mesh axis does not divide.

    Returns:
      ``tree``'s structure with a ``PartitionSpec`` at each leaf.
    """
    notes: list[str] = []

    def spec(path: Any, leaf: Any) -> PartitionSpec:
        shape = tuple(np.shape(leaf))
        return _leaf_spec(path_str(path), shape, mesh, notes)

    specs = jax.tree_util.tree_map_with_path(spec, tree)
    fallbacks = [n for n in notes if "not divisible" in n]
    if strict and fallbacks:
        raise ValueError(f"cannot shard {fallbacks[0]} (and {len(fallbacks) - 1} more)")
    if notes:
        shown = "\n  ".join(notes[:8]) + (
            f"\n  ... {len(notes) - 8} more" if len(notes) > 8 else ""
        )
        log.warning("sharding fell back to replication for %d array(s):\n  %s", len(notes), shown)
    return specs


def sharding_fallbacks(tree: Any, mesh: Mesh) -> list[str]:
    """Human-readable notes for every leaf (dimension) of ``tree`` that is replicated by fallback."""
    notes: list[str] = []
    jax.tree_util.tree_map_with_path(
        lambda p, x: _leaf_spec(path_str(p), tuple(np.shape(x)), mesh, notes), tree
    )
    return notes


def _to_shardings(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def param_shardings(mesh: Mesh, state: Any, *, strict: bool = False) -> Any:
    """``NamedSharding`` per parameter of ``state`` (an ``nnx.State``, concrete or abstract).

    Use it for ``jax.device_put``, ``jit(in_shardings=..., out_shardings=...)`` or an orbax
    restore target.
    """
    return _to_shardings(mesh, partition_specs(state, mesh, strict=strict))


def optimizer_state_shardings(mesh: Mesh, opt_state: Any, *, strict: bool = False) -> Any:
    """``NamedSharding`` per leaf of an optax state: moments like their parameter, scalars
    replicated (the rules match the parameter path at the end of each leaf's path).

    ``opt_state`` may be abstract: ``jax.eval_shape(tx.init, params)``.
    """
    return _to_shardings(mesh, partition_specs(opt_state, mesh, strict=strict))


def shard_params(model_state: Any, mesh: Mesh, *, strict: bool = False) -> Any:
    """``model_state`` with every array placed according to ``param_shardings``."""
    return jax.device_put(model_state, param_shardings(mesh, model_state, strict=strict))


# --------------------------------------------------------------------------------------------
# Batches


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh (scalars, PRNG keys, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (row) axis split over ``data`` x ``fsdp``; other axes and ``tensor`` replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: ``data * fsdp``."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this process's rows: every leaf [rows, ...] split by ``batch_sharding``.

    In a multi-host run each process passes its own rows (the same count everywhere) and gets
    the global array of all processes' rows. Raises ``ValueError`` naming the leaf when the
    global row count is not divisible by ``data * fsdp``.
    """
    sharding = batch_sharding(mesh)
    ways = batch_parallelism(mesh)

    def place(path: Any, leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        rows = (leaf.shape[0] if leaf.ndim else 0) * jax.process_count()
        if leaf.ndim == 0 or rows % ways:
            raise ValueError(
                f"batch leaf {path_str(path) or '<root>'} has {rows} rows (shape "
                f"{list(leaf.shape)} x {jax.process_count()} process(es)), not divisible by "
                f"data*fsdp = {ways}"
            )
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map_with_path(place, batch)


# --------------------------------------------------------------------------------------------
# Placement, resharding and the rollout engine's KV cache


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
    global arrays ``tree`` on ``mesh``, sharded over ``local_mesh`` by the parameter rules.

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


def kv_cache_shardings(mesh: Mesh, cache: Any) -> Any:
    """Shardings of a rollout KV-cache pool (``models.KVCache``, concrete or abstract) on ``mesh``.

    Per layer, keys [slots, kv_heads, head_dim, max_len] and values [slots, kv_heads, max_len,
    head_dim]: slots over ``("data", "fsdp")`` and kv heads over ``tensor``, each only when the
    axis divides the dimension (replicated on that axis otherwise); ``lengths`` replicated.
    Sharding the slots divides the pool's memory by ``data * fsdp``; the price is that a batch
    reads its slots with a masked local gather plus an all-reduce of the batch's keys and values
    (XLA's partitioning of a gather along a sharded dimension), since a batch row may live on any
    device; the engine's decode loop does this once per call (``models.gather_slots``), not per
    step.
    """
    slots, kv_heads = np.shape(cache.k[0])[:2]
    ways = batch_parallelism(mesh)
    slot_axes = BATCH_AXES if slots % ways == 0 else None
    head_axis = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
    if slot_axes is None or head_axis is None:
        log.info(
            "KV cache (%d layers of %s): slots %s, kv heads %s",
            len(cache.k),
            "x".join(map(str, np.shape(cache.k[0]))),
            "sharded" if slot_axes else f"replicated ({slots} not divisible by {ways})",
            "sharded" if head_axis else "replicated",
        )
    kv = NamedSharding(mesh, PartitionSpec(slot_axes, head_axis, None, None))
    per_layer = tuple(kv for _ in cache.k)
    return KVCache(k=per_layer, v=per_layer, lengths=replicated(mesh))


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


def engine_cache_shardings(
    mesh: Mesh | None, model_config: Any, num_slots: int, max_len: int
) -> Any:
    """``kv_cache_shardings`` for an engine's pool of ``num_slots`` x ``max_len``; None (the
    engine's default placement) without a mesh or on a one-device mesh."""
    if mesh is None or mesh.size == 1:
        return None
    abstract = jax.eval_shape(lambda: init_cache(model_config, num_slots, max_len))
    return kv_cache_shardings(mesh, abstract)
