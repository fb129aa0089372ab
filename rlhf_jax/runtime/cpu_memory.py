"""On CPU, XLA takes each step's scratch memory (hundreds of MB) from glibc's malloc, which maps such blocks fresh
from the kernel on every call and unmaps them when freed: tens of thousands of page faults and a quarter of a
training step spent in the kernel. Keeping freed memory in the process removes that cost (docs/performance.md).
`keep_freed_memory` makes the same settings as `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`
through `mallopt` at start-up, so every CPU run gets them, not only `make demo`'s."""

from __future__ import annotations

import ctypes
import glob
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/accel*", "/dev/vfio/[0-9]*", "/dev/kfd")  # NVIDIA, TPU, TPU, AMD


def keep_freed_memory(environ=os.environ) -> bool:
    """Whether glibc was told to keep freed memory: on Linux hosts without an accelerator, unless the user set
    malloc's variables (or JAX_PLATFORMS names another platform) themselves."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ or any(
            k.startswith("MALLOC_") for k in environ):
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms != "cpu" and (platforms or any(glob.glob(p) for p in ACCELERATOR_DEVICES)):
        return False  # accelerators hold the big buffers; the host's memory is left as glibc manages it
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
