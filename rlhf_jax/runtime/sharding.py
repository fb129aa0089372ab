"""Device mesh, a short logical-axis -> mesh-axis table, and placement of params and batches."""

from __future__ import annotations

import contextvars
import functools
import math
import re
import sys
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")  # what AXIS_RULES split over

# Logical name -> mesh axes. Parameters carry logical names (see model.py); a dimension that a mesh axis
# does not divide is replicated along it instead (`sharding_report` lists those fallbacks).
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


# Named topologies -> (shape, axes). Parameters and optimizer state are split (FSDP) over the devices that share
# fast links (a slice's ICI, a node's NVLink); the data axis spans the slower links between nodes.
MESH_PRESETS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "v5e-16": ((1, 16, 1), ("data", "fsdp", "tensor")),  # 4 hosts x 4 chips
    "v5p-64": ((1, 32, 1), ("data", "fsdp", "tensor")),  # 8 hosts x 4 chips (64 TensorCores, 32 devices)
    "8xH100": ((1, 8, 1), ("data", "fsdp", "tensor")),  # one node
    "2x8xH100": ((2, 8, 1), ("data", "fsdp", "tensor")),  # two nodes: data across them, FSDP inside each
}


def mesh_from_config(section, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a config's `mesh` section: its preset (whose device count must match) or its shape."""
    if section.preset:
        shape, axes = MESH_PRESETS[section.preset]
        found = len(devices if devices is not None else jax.devices())
        if math.prod(shape) != found:
            raise MeshError(f"mesh.preset {section.preset} needs {math.prod(shape)} devices, found {found} "
                            f"({jax.process_count()} processes)"
                            + _cpu_devices_hint(devices if devices is not None else jax.devices(), math.prod(shape)))
        mesh = make_mesh(shape, axes, devices)
    else:
        mesh = make_mesh(section.shape, section.axes, devices)
    check_process_blocks(mesh)
    return mesh


def check_process_blocks(mesh: Mesh) -> None:
    """With several processes each must hold one block of every batch, process i the i-th (as the data pipeline
    reads it): the data-parallel axes split over the processes in order, and no other axis spans them."""
    count = jax.process_count()
    if count == 1:
        return
    ways = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    placement = batch_sharding(mesh).devices_indices_map((ways,))
    per_process = ways // count if ways % count == 0 else 0
    if not per_process or any((index[0].start or 0) // per_process != device.process_index
                              for device, index in placement.items()):
        shape = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
        split = f"{', '.join(batch_axes(mesh))}: {ways} way{'s' * (ways != 1)}"
        raise MeshError(f"mesh {shape}: with {count} processes every process must hold its own block of each "
                        f"batch, so the data-parallel axes ({split}) must split over the processes; keep the other "
                        "axes (tensor) within a host")


def _cpu_devices_hint(devices: Sequence[jax.Device], wanted: int) -> str:
    """How to get more devices where they are CPU devices, which XLA makes as many of per process as it is told."""
    processes = jax.process_count()
    if not devices or devices[0].platform != "cpu" or wanted % processes:
        return ""
    each = f" in each of the {processes} processes" if processes > 1 else ""
    return (f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={wanted // processes}{each} makes "
            f"{wanted})")


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
        raise MeshError(f"mesh.shape {shape} needs {math.prod(shape)} devices, found {len(devices)}"
                        + _cpu_devices_hint(devices, math.prod(shape)))
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)


class Fallback(NamedTuple):
    """One dimension left unsplit along a mesh axis because the axis (times those already splitting it) does
    not divide it."""

    logical_name: str
    dim: int
    mesh_axis: str
    divisor_axes: tuple[tuple[str, int], ...]  # (axis, size) of the split that failed, this axis last


def resolve_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> tuple[P, list[Fallback]]:
    """PartitionSpec for one array and the replicated fallbacks behind it: each logical name maps to the mesh
    axes of the table that divide it. An axis of size 1 or one already taken by another dimension is the table's
    choice, not a fallback."""
    used: set[str] = set()
    spec, fallbacks = [], []
    for name, dim in zip(logical_axes, shape):
        chosen: list[str] = []
        for axis in AXIS_RULES.get(name, ()) if name else ():
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                divisor = tuple((a, mesh.shape[a]) for a in chosen) + ((axis, size),)
                fallbacks.append(Fallback(name, dim, axis, divisor))
                continue
            chosen.append(axis)
            used.add(axis)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec), fallbacks


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for one array (see `resolve_spec`); an undivided dimension is replicated."""
    return resolve_spec(logical_axes, shape, mesh)[0]


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_shardings(logical_axes_tree, shapes_tree, mesh: Mesh):
    """NamedShardings for a param tree, from its logical names (`model.param_logical_axes`) and shapes."""
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), x.shape, mesh)),
                        logical_axes_tree, shapes_tree, is_leaf=_is_spec)


class KindSummary(NamedTuple):
    """Parameters of one kind (same path up to layer index, same shape and split), e.g. `layer_*/attn/qkv`."""

    kind: str
    count: int
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    spec: P
    bytes_total: int
    bytes_per_device: int


class ShardingReport(NamedTuple):
    kinds: list[KindSummary]
    bytes_total: int
    bytes_per_device: int
    lines: list[str]  # the summary table, one screen
    fallbacks: list[str]  # one warning per (logical name, dim, mesh axis)


def param_kind(path) -> str:
    """Leaf path with layer indices collapsed: ('layer_3', 'attn', 'qkv') -> 'layer_*/attn/qkv'."""
    keys = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
    return "/".join(re.sub(r"^(\w*?_)?\d+$", r"\1*", k) for k in keys)


def sharding_report(logical_axes_tree, shapes_tree, mesh: Mesh, dtype=None) -> ShardingReport:
    """How a param tree splits over `mesh`: one row per parameter kind, totals, and the replicated fallbacks.
    Bytes are for `dtype`, or each leaf's own dtype when None. Reads only shapes, so nothing is allocated."""
    paths_and_axes, treedef = jax.tree_util.tree_flatten_with_path(logical_axes_tree, is_leaf=_is_spec)
    shapes = treedef.flatten_up_to(shapes_tree)
    kinds: dict[tuple, KindSummary] = {}
    fallback_kinds: dict[tuple[str, int, str], tuple[Fallback, list[str]]] = {}
    for (path, axes), x in zip(paths_and_axes, shapes):
        kind, shape, axes = param_kind(path), tuple(x.shape), tuple(axes)
        spec, fallbacks = resolve_spec(axes, shape, mesh)
        nbytes = math.prod(shape) * np.dtype(dtype or x.dtype).itemsize
        per_device = nbytes // _ways(spec, mesh)  # exact: only dividing axes are chosen
        key = (kind, shape, axes, spec, nbytes)
        row = kinds.get(key) or KindSummary(kind, 0, shape, axes, spec, 0, 0)
        kinds[key] = row._replace(count=row.count + 1, bytes_total=row.bytes_total + nbytes,
                                  bytes_per_device=row.bytes_per_device + per_device)
        for fb in fallbacks:
            affected = fallback_kinds.setdefault((fb.logical_name, fb.dim, fb.mesh_axis), (fb, []))[1]
            if kind not in affected:
                affected.append(kind)
    rows = list(kinds.values())
    total = sum(r.bytes_total for r in rows)
    per_device = sum(r.bytes_per_device for r in rows)
    return ShardingReport(rows, total, per_device, _summary_lines(rows, total, per_device, mesh),
                          [_fallback_warning(fb, affected) for fb, affected in fallback_kinds.values()])


def print_sharding_report(report: ShardingReport, file=None) -> None:
    """The summary table, then each fallback warning once."""
    file = file or sys.stderr
    for line in report.lines + report.fallbacks:
        print(line, file=file)


def _ways(spec: P, mesh: Mesh) -> int:
    """Number of pieces an array with this spec is cut into (its copies along other axes not counted)."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh.shape[a] for a in axes)


def _fallback_warning(fb: Fallback, kinds: list[str]) -> str:
    noun = "axis" if len(fb.divisor_axes) == 1 else "axes"
    divisor = "*".join(f"{a}={s}" for a, s in fb.divisor_axes)
    return (f"warning: sharding: {fb.logical_name!r} dim {fb.dim} of {', '.join(kinds)} is not divisible by mesh "
            f"{noun} {divisor}; replicated along {fb.mesh_axis}")


def _summary_lines(rows: list[KindSummary], total: int, per_device: int, mesh: Mesh) -> list[str]:
    mesh_desc = " ".join(f"{a}={s}" for a, s in mesh.shape.items())
    table = [("kind", "n", "shape", "logical axes", "split as", "total", "per device")]
    for r in rows:
        table.append((r.kind, str(r.count), _dims(r.shape), _dims(r.logical_axes), _dims(_spec_names(r.spec)),
                      format_bytes(r.bytes_total), format_bytes(r.bytes_per_device)))
    table.append(("total", str(sum(r.count for r in rows)), "", "", "", format_bytes(total),
                  format_bytes(per_device)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {1, 5, 6}  # numbers right-aligned
    render = lambda row: "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return [f"sharding: params over mesh {mesh_desc} ({mesh.size} devices)"] + [render(row) for row in table]


def _spec_names(spec: P) -> tuple[str | None, ...]:
    return tuple(e if e is None or isinstance(e, str) else "*".join(e) for e in spec)


def _dims(items) -> str:
    return "(" + ", ".join("-" if i is None else str(i) for i in items) + ")"


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in AXIS_RULES["batch"] if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over the data-parallel axes, the rest replicated (any rank)."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# The batch sharding of the program being traced by `jit` (None outside one): what `constrain_batch` applies.
_ACTIVATIONS: contextvars.ContextVar[NamedSharding | None] = contextvars.ContextVar("activations", default=None)


def jit(fn: Callable, mesh: Mesh, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` for a program over `mesh` whose models keep their activations split over the
    data-parallel axes (`constrain_batch`). Without that, XLA is free to split a matmul by its weights' FSDP
    axis instead, replicating activations: Qwen2.5-0.5B's PPO step on an fsdp axis of 8 then holds 67 GiB of
    temporaries per device instead of 10."""
    activations = batch_sharding(mesh)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        token = _ACTIVATIONS.set(activations)
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVATIONS.reset(token)

    return jax.jit(traced, **jit_kwargs)


def constrain_batch(x_B: jax.Array) -> jax.Array:
    """`x_B` split along its leading (batch) dimension over the data-parallel axes, the rest replicated, while a
    `jit` traces; unchanged outside one or when the devices do not divide the batch."""
    activations = _ACTIVATIONS.get()
    if activations is None:
        return x_B
    ways = math.prod(activations.mesh.shape[a] for a in batch_axes(activations.mesh))
    if ways == 1 or x_B.shape[0] % ways:
        return x_B
    return jax.lax.with_sharding_constraint(x_B, activations)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
    ways = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if batch_size % ways:
        raise MeshError(f"{key}={batch_size} is not divisible by the {ways} data-parallel devices of the mesh")


def place(tree, shardings):
    """Put host arrays (numpy or jax) onto the mesh with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if not isinstance(x, jax.Array) else x, s),
                        tree, shardings)
