"""The device mesh: three named axes, sizes from :class:`MeshSettings` (DESIGN.md §8).

- ``data``: pure data parallelism (parameters replicated across it);
- ``fsdp``: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3);
- ``tensor``: Megatron-style tensor parallelism inside each layer.

Batches are split over ``data`` x ``fsdp`` on their leading (row) axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Mesh axis sizes (the ``mesh`` section of a run's config).

    Attributes:
      data: replicas that each hold the whole model (pure data parallelism).
      fsdp: devices that share one copy of the parameters, gradients and optimizer state
        (ZeRO-3 / FSDP); batches are split over ``data`` x ``fsdp``.
      tensor: devices that split each layer's matmuls (Megatron column/row parallelism).

    One axis may be -1, "all remaining devices". The default, ``data=-1``, is plain data
    parallelism over every device; large policies set ``data=1, fsdp=-1``.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        resolve_mesh_shape(self, None)  # validates the sizes; the device count comes later


def _sizes(settings: MeshSettings | Mapping[str, Any], prefix: str) -> list[Any]:
    if isinstance(settings, MeshSettings):
        return [settings.data, settings.fsdp, settings.tensor]
    sizes = []
    for axis in MESH_AXES:
        if axis not in settings:
            raise ValueError(f"{prefix}.{axis} is missing (mesh axes: {MESH_AXES})")
        sizes.append(settings[axis])
    return sizes


def resolve_mesh_shape(
    settings: MeshSettings | Mapping[str, Any], num_devices: int | None, prefix: str = "mesh"
) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes for ``num_devices`` devices, with a -1 filled in.

    ``num_devices=None`` only validates the sizes (a -1 stays -1).

    Raises:
      ValueError: naming ``<prefix>.<axis>`` for a size that is not a positive int or -1, more
        than one -1, a product that does not divide (with a -1) or equal the device count.
    """
    sizes = _sizes(settings, prefix)
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
            raise ValueError(f"{prefix}.{axis}={size!r} must be a positive integer or -1")
    described = ", ".join(f"{prefix}.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(
            f"{described}: at most one mesh axis may be -1 (the rest); give the others sizes, "
            f"e.g. {prefix}.data=1 with {prefix}.fsdp=-1"
        )
    if num_devices is None:
        return tuple(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"{described}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices"
            )
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"{described}: the axes multiply to {known} but there are {num_devices} devices "
            "(set one axis to -1 to use the rest)"
        )
    return tuple(sizes)


def make_mesh(
    settings: MeshSettings | Mapping[str, Any] = MeshSettings(),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all hosts).

    Devices are laid out with ``mesh_utils.create_device_mesh`` (ICI/NVLink-aware: the last
    axis, ``tensor``, gets the closest devices) and fall back to their listed order. Axes are
    ``AxisType.Auto``: shardings propagate through the model code from the parameters' and
    batches' shardings.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(settings, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_parallelism(mesh: Any) -> int:
    """How many ways a batch's rows are split: ``data * fsdp``."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
