"""What a dry run measures against: the device memory and the peak matmul rate of one device, from the flags,
the device's own allocator limit or a table of nominal figures per device kind; and the GiB formatting of byte
counts it prints."""

from __future__ import annotations

from typing import NamedTuple

import jax

from rlhf_jax.runtime import sharding

GIB = 1024 ** 3


class DeviceSpec(NamedTuple):
    """Nominal memory of one device (GiB) and its dense peak TFLOP/s for bf16 and float32 matmuls."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float | None  # None: not published for full-precision float32 matmuls (TPUs)


# Matched against jax's device_kind (lower case, every substring present); the first match wins.
DEVICE_SPECS: list[tuple[tuple[str, ...], DeviceSpec]] = [
    (("h100", "pcie"), DeviceSpec("H100 PCIe", 80, 756, 51)),
    (("h100",), DeviceSpec("H100 SXM", 80, 989, 67)),
    (("gh200",), DeviceSpec("GH200", 96, 989, 67)),  # the 96 GB part (also sold with 144): the allocator's limit wins
    (("h200",), DeviceSpec("H200", 140, 989, 67)),
    (("a100", "40gb"), DeviceSpec("A100 40GB", 40, 312, 19.5)),
    (("a100",), DeviceSpec("A100 80GB", 80, 312, 19.5)),
    (("tpu v3",), DeviceSpec("TPU v3 (one core)", 16, 61.5, None)),
    (("tpu v4",), DeviceSpec("TPU v4", 32, 275, None)),
    (("tpu v5 lite",), DeviceSpec("TPU v5e", 16, 197, None)),
    (("tpu v5e",), DeviceSpec("TPU v5e", 16, 197, None)),
    (("tpu v5",), DeviceSpec("TPU v5p", 95, 459, None)),
    (("tpu v6",), DeviceSpec("TPU v6e", 32, 918, None)),
]


def device_spec(kind: str) -> DeviceSpec | None:
    kind = kind.lower()
    return next((spec for keys, spec in DEVICE_SPECS if all(k in kind for k in keys)), None)


class Budget(NamedTuple):
    """What a verdict and a step time are measured against (None: unknown), and where each figure came from."""

    memory: int | None  # bytes per device
    memory_source: str
    peak: dict[str, float | None]  # compute dtype -> FLOP/s per device
    peak_source: str


def budget(device: jax.Device, memory_gib: float | None = None, peak_tflops: float | None = None) -> Budget:
    """--device-memory / --peak-tflops, else the device's own allocator limit and the table's figures."""
    spec = device_spec(device.device_kind)
    kind = device.device_kind if device.device_kind.lower() == device.platform else \
        f"{device.device_kind} ({device.platform})"
    if memory_gib is not None:
        memory, memory_source = int(memory_gib * GIB), "--device-memory"
    else:
        limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
        if limit:
            memory, memory_source = int(limit), f"what XLA may allocate on the {kind}"
        elif spec is not None:
            memory, memory_source = int(spec.memory_gib * GIB), f"{spec.name}'s {spec.memory_gib:g} GiB"
        else:
            memory, memory_source = None, f"unknown for {kind}: pass --device-memory GIB for a verdict"
    if peak_tflops is not None:
        peak = {"bfloat16": peak_tflops * 1e12, "float32": peak_tflops * 1e12}
        peak_source = f"--peak-tflops {peak_tflops:g}"
    elif spec is not None:
        peak = {"bfloat16": spec.bf16_tflops * 1e12,
                "float32": spec.fp32_tflops * 1e12 if spec.fp32_tflops else None}
        fp32 = f"{spec.fp32_tflops:g}" if spec.fp32_tflops else "unknown"
        peak_source = f"{spec.name}: {spec.bf16_tflops:g} TFLOP/s bf16, {fp32} float32"
    else:
        peak, peak_source = {}, f"unknown for {kind}: pass --peak-tflops T for step times"
    return Budget(memory, memory_source, peak, peak_source)


def gib(n: int) -> str:
    return sharding.format_bytes(int(n))
