"""The parallel layer: device meshes, logical-axis sharding rules, placement and the
multi-process collectives (DESIGN.md §8, docs/architecture.md).

It imports nothing else of the project: models declare logical axis names on their arrays, this
layer maps them to a mesh.

    mesh = parallel.make_mesh(parallel.MeshSettings(data=1, fsdp=-1))
    shardings = parallel.param_shardings(mesh, nnx.state(model))   # from declared logical axes
    batch = parallel.shard_batch(rows, mesh)                        # rows over ("data", "fsdp")
"""

from atpo_jax.parallel.collectives import (
    DistributedSettings,
    allgather_concat,
    allgather_objects,
    barrier,
    initialize,
    is_main_process,
    local_prompt_positions,
    main_process_first,
    settings_from,
    split_evenly,
)
from atpo_jax.parallel.mesh import (
    BATCH_AXES,
    MESH_AXES,
    MeshSettings,
    batch_parallelism,
    make_mesh,
    resolve_mesh_shape,
)
from atpo_jax.parallel.placement import (
    Placement,
    batch_sharding,
    gather_to_host,
    host_local_copy,
    place,
    process_batch_block,
    replicated,
    reshard,
    shard_batch,
    shard_params,
)
from atpo_jax.parallel.rules import (
    AXES_METADATA,
    LOGICAL_AXIS_RULES,
    UndeclaredAxesError,
    logical_shardings,
    param_shardings,
    partition_specs,
    path_str,
    sharding_fallbacks,
    to_shardings,
)

__all__ = [
    "AXES_METADATA",
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "DistributedSettings",
    "MeshSettings",
    "Placement",
    "UndeclaredAxesError",
    "allgather_concat",
    "allgather_objects",
    "barrier",
    "batch_parallelism",
    "batch_sharding",
    "gather_to_host",
    "host_local_copy",
    "initialize",
    "is_main_process",
    "local_prompt_positions",
    "logical_shardings",
    "main_process_first",
    "make_mesh",
    "param_shardings",
    "partition_specs",
    "path_str",
    "place",
    "process_batch_block",
    "replicated",
    "reshard",
    "resolve_mesh_shape",
    "settings_from",
    "shard_batch",
    "shard_params",
    "sharding_fallbacks",
    "split_evenly",
    "to_shardings",
]
