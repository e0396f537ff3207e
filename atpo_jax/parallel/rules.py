"""Logical-axis rules: arrays declare what their dimensions mean, one table maps that to the mesh.

A module that creates a parameter declares a logical name per dimension as the variable's
``logical_axes`` metadata (``nnx.Param(value, logical_axes=("embed", "vocab"))``; ``None`` for a
dimension that is never split). :data:`LOGICAL_AXIS_RULES` maps each name to a mesh axis (or a
tuple of axes, or ``None`` = replicated). The table of the decoder's parameters:

| parameter                        | shape   | logical axes     | PartitionSpec        |
|----------------------------------|---------|------------------|----------------------|
| ``embed_tokens/embedding``       | [V, H]  | (vocab, embed)   | (tensor, fsdp)       |
| ``lm_head/kernel``               | [H, V]  | (embed, vocab)   | (fsdp, tensor)       |
| ``{q,k,v}_proj/kernel`` (column) | [H, ND] | (embed, heads)   | (fsdp, tensor)       |
| ``o_proj/kernel`` (row-parallel) | [ND, H] | (heads, embed)   | (tensor, fsdp)       |
| ``{gate,up}_proj/kernel``        | [H, F]  | (embed, mlp)     | (fsdp, tensor)       |
| ``down_proj/kernel``             | [F, H]  | (mlp, embed)     | (tensor, fsdp)       |
| norms, biases                    | [H]     | (None,)          | replicated           |

Optimizer state gets its parameters' layout for free: optax builds Adam's ``mu``/``nu`` with
``jax.tree.map`` over the parameter tree, which keeps each variable and its metadata. Scalars
(counters, flags) are replicated.

An array that declares nothing is an error, not a silent replication: :class:`UndeclaredAxesError`
names it. Non-divisible dimensions: a dimension that its mesh axis does not divide evenly (JAX
rejects uneven shardings of stored arrays) is replicated along that axis instead, and one warning
lists every such array; ``strict=True`` turns that into a ``ValueError``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atpo_jax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)

AXES_METADATA = "logical_axes"

# Logical dimension name -> mesh axis (a tuple: split over several; None: replicated).
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "kv_heads": "tensor",
    "batch": BATCH_AXES,  # rows of a batch; KV-cache slots
}


class UndeclaredAxesError(ValueError):
    """An array that must be placed on a mesh declares no logical axes (or unknown ones)."""


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


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def declared_axes(path: str, leaf: Any) -> tuple[str | None, ...]:
    """The logical axes ``leaf`` declares; () for a scalar. Raises for an undeclared array."""
    shape = _shape_of(leaf)
    axes = leaf.get_metadata().get(AXES_METADATA) if _is_variable(leaf) else None
    if axes is None:
        if not shape:
            return ()
        raise UndeclaredAxesError(
            f"{path or '<root>'} {list(shape)} declares no logical axes: create it as "
            f"nnx.Param(value, {AXES_METADATA}=(...)) with one name per dimension (None for a "
            f"dimension that is never split); known names: {sorted(LOGICAL_AXIS_RULES)}"
        )
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise UndeclaredAxesError(
            f"{path} {list(shape)} declares {len(axes)} logical axes {axes} for {len(shape)} dims"
        )
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXIS_RULES]
    if unknown:
        raise UndeclaredAxesError(
            f"{path}: logical axis {unknown[0]!r} has no rule; known: {sorted(LOGICAL_AXIS_RULES)}"
        )
    return axes


def _shape_of(leaf: Any) -> tuple[int, ...]:
    if _is_variable(leaf):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
        return tuple(np.shape(value))
    return tuple(np.shape(leaf))


def spec_for(
    path: str,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    mesh: Any,
    notes: list[str] | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with ``shape`` and logical ``axes`` on ``mesh``; a
    dimension its mesh axes do not divide is replicated (and noted)."""
    spec = []
    used: set[str] = set()
    for dim, (size, name) in enumerate(zip(shape, axes, strict=True)):
        target = None if name is None else LOGICAL_AXIS_RULES[name]
        names = () if target is None else (target if isinstance(target, tuple) else (target,))
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if names and used & set(names):
            raise UndeclaredAxesError(
                f"{path}: dim {dim} ({name}) maps to mesh axis {target!r}, which an earlier "
                "dimension already uses"
            )
        if names and size % ways:
            if notes is not None:
                notes.append(
                    f"{path} {list(shape)}: dim {dim} ({name}, size {size}) is not divisible by "
                    f"mesh axis {target!r} of size {ways}; replicated on it"
                )
            target = None
        if target is not None:
            used.update(names)
        spec.append(target)
    return PartitionSpec(*spec) if any(a is not None for a in spec) else PartitionSpec()


def partition_specs(tree: Any, mesh: Any, *, strict: bool = False) -> Any:
    """A ``PartitionSpec`` per array of ``tree`` (parameters, optimizer state; abstract or not).

    Args:
      tree: a pytree whose arrays are ``nnx.Variable``s declaring ``logical_axes`` (an
        ``nnx.State``, an optax state built over one) or scalars.
      mesh: a mesh (or ``AbstractMesh``) with the ``MESH_AXES`` names.
      strict: raise instead of replicating a dimension that its mesh axis does not divide.

    Returns:
      ``tree``'s structure with a ``PartitionSpec`` at each array leaf (inside its variable).

    Raises:
      UndeclaredAxesError: an array (>= 1 dims) declares no logical axes, or an unknown one.
    """
    notes: list[str] = []

    def spec(path: Any, leaf: Any) -> Any:
        name = path_str(path)
        axes = declared_axes(name, leaf)
        found = spec_for(name, _shape_of(leaf), axes, mesh, notes) if axes else PartitionSpec()
        # Keep the variable around its spec: the spec tree has the structure of ``tree`` (what
        # ``jit(in_shardings=...)``, ``device_put`` and orbax targets expect).
        return leaf.replace(value=found) if _is_variable(leaf) else found

    specs = jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_is_variable)
    if strict and notes:
        raise ValueError(f"cannot shard {notes[0]} (and {len(notes) - 1} more)")
    if notes:
        shown = "\n  ".join(notes[:8]) + (
            f"\n  ... {len(notes) - 8} more" if len(notes) > 8 else ""
        )
        log.warning("sharding fell back to replication for %d array(s):\n  %s", len(notes), shown)
    return specs


def sharding_fallbacks(tree: Any, mesh: Any) -> list[str]:
    """One note per array dimension of ``tree`` that is replicated because its axis does not
    divide it."""
    notes: list[str] = []

    def visit(path: Any, leaf: Any) -> None:
        name = path_str(path)
        axes = declared_axes(name, leaf)
        if axes:
            spec_for(name, _shape_of(leaf), axes, mesh, notes)

    jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_variable)
    return notes


def to_shardings(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding``s on ``mesh`` for a tree of ``PartitionSpec``s."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def param_shardings(mesh: Mesh, tree: Any, *, strict: bool = False) -> Any:
    """``NamedSharding`` per array of ``tree``: parameters (an ``nnx.State``) or optimizer state
    (optax, built over one), concrete or abstract. For ``jax.device_put``,
    ``jit(in_shardings=..., out_shardings=...)`` or an orbax restore target."""
    return to_shardings(mesh, partition_specs(tree, mesh, strict=strict))


def logical_shardings(mesh: Mesh, tree: Any, axes: Any) -> Any:
    """Shardings for a tree of plain arrays (``tree``, concrete or abstract) whose logical axes
    come as a parallel tree ``axes`` of tuples (e.g. ``models.KVCache.logical_axes``).
    Non-divisible dimensions are replicated, with an info line."""
    notes: list[str] = []

    def one(path: Any, leaf: Any, leaf_axes: tuple[str | None, ...]) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        return NamedSharding(mesh, spec_for(path_str(path), shape, tuple(leaf_axes), mesh, notes))

    shardings = jax.tree_util.tree_map_with_path(one, tree, axes)
    if notes:
        log.info("replicated where the mesh does not divide:\n  %s", "\n  ".join(notes[:8]))
    return shardings
