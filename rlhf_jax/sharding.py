"""Device mesh, a short logical-axis -> mesh-axis table, and placement of params and batches."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.errors import UserError

# Logical name -> mesh axes. Parameters carry logical names (see model.py); a dimension that a mesh axis
# does not divide is replicated along it instead.
AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
}


class MeshError(UserError):
    """A mesh shape that does not fit the devices or the batch."""


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over all (or the given) devices; one -1 in `shape` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise MeshError(f"mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh.shape {shape} needs {math.prod(shape)} devices, found {len(devices)}")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical name maps to the mesh axes of the table that divide it."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        chosen = []
        for axis in AXIS_RULES.get(name, ()) if name else ():
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
            used.add(axis)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def param_shardings(logical_axes_tree, shapes_tree, mesh: Mesh):
    """NamedShardings for a param tree, from its logical names (`model.param_logical_axes`) and shapes."""
    is_spec = lambda x: isinstance(x, P)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), x.shape, mesh)),
                        logical_axes_tree, shapes_tree, is_leaf=is_spec)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in AXIS_RULES["batch"] if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over the data-parallel axes, the rest replicated (any rank)."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
    ways = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if batch_size % ways:
        raise MeshError(f"{key}={batch_size} is not divisible by the {ways} data-parallel devices of the mesh")


def place(tree, shardings):
    """Put host arrays (numpy or jax) onto the mesh with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(x, jax.Array) else x, s),
                        tree, shardings)
