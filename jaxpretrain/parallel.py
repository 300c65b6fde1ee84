"""The device mesh and the one table that says how named array axes map onto it (joining a run:
jaxpretrain.processes, re-exported here as `initialize_distributed`).

The mesh has three axes, outermost first:

    replicate  HSDP's replica groups: parameters are copied across it, the batch is split over it.
    fsdp       FSDP: parameters are split over it (their embed dimension), and so is the batch.
    tensor     tensor parallelism: attention heads, MLP columns and vocabulary rows split over it.

Model code names the axes of its arrays logically ("vocab", "embed", "heads", ...); the table
`LOGICAL_AXIS_RULES` is the only place that turns those names into mesh axes (MaxText's approach).
Devices are laid out process-major, so each process owns one contiguous block of the batch and, on
GPU nodes, the innermost `tensor` axis stays inside one node's NVLink domain.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpretrain.errors import UserError
from jaxpretrain.processes import initialize_distributed  # noqa: F401  (joining a run lives there)

MESH_AXES = ("replicate", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None: replicated). A mesh axis is used at most once per
# array, and a dimension it does not divide evenly stays replicated (tiny test vocabularies).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations.
    ("batch", ("replicate", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),  # GQA's k/v; fewer kv heads than tp: replicated (the divisibility rule)
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters.
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # Llama's k/v projections: whole kv heads per tensor rank, else replicated
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("positions", None),
    ("qkv", None),
)

# The mesh axes a batch is split over: the one source for the batch sharding and micro-batching.
DATA_AXES: tuple[str, ...] = dict(LOGICAL_AXIS_RULES)["batch"]


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


def make_mesh(
    *,
    dp_replicate_size: int = 1,
    dp_shard_size: int | None = None,
    tp_size: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("replicate", "fsdp", "tensor") mesh over `devices` (default: all); dp_shard_size=None fills."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("dp_replicate_size", dp_replicate_size), ("tp_size", tp_size)):
        if size < 1:
            raise UserError(f"distributed.{name}: must be >= 1, got {size}")
    if dp_shard_size is None or dp_shard_size in (0, -1):
        if n % (dp_replicate_size * tp_size):
            raise UserError(
                f"distributed: {n} devices are not divisible by dp_replicate_size x tp_size = "
                f"{dp_replicate_size} x {tp_size}"
            )
        dp_shard_size = n // (dp_replicate_size * tp_size)
    shape = (dp_replicate_size, dp_shard_size, tp_size)
    if math.prod(shape) != n:
        raise UserError(
            f"distributed: dp_replicate_size x dp_shard_size x tp_size = "
            f"{dp_replicate_size} x {dp_shard_size} x {tp_size} != {n} devices"
        )
    # Process-major order: a process's devices are neighbours along the batch axes.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------------------
# Logical axes -> mesh axes
# ------------------------------------------------------------------------------------------------


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec the rules give an array whose dimensions are named `logical_axes`.

    With `mesh` and `shape`, mesh axes the mesh lacks are dropped and a dimension that the mesh
    axes' total size does not divide is left replicated.
    """
    if not logical_axes:
        return PartitionSpec()
    table = dict(rules)
    mesh_sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh_sizes is None or a in mesh_sizes))
        if axes and shape is not None and mesh_sizes is not None:
            if shape[i] % math.prod(mesh_sizes[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_to_mesh_sharding(
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """The NamedSharding on `mesh` for an array with these logical axes (and this shape, if given)."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, shape, mesh, rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axes when traced under `jax.set_mesh(mesh)`.

    Outside a mesh context this is the identity, so model code runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: batch over ("replicate", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (replicate x fsdp)."""
    return math.prod(mesh.shape[a] for a in DATA_AXES)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the batch axes.

    Every process passes its own contiguous share of the global batch (process p holds rows
    `[p * local, (p + 1) * local)`), all with the same local batch size.
    """
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        if global_shape[0] % data_parallel_size(mesh):
            raise UserError(
                f"batch '{key}': global batch {global_shape[0]} is not divisible by the "
                f"data-parallel size {data_parallel_size(mesh)}"
            )
        sharding = batch_sharding(mesh, local.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
