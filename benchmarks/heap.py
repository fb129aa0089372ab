"""`release_freed_memory`: hands the memory glibc's malloc holds freed back to the system (`malloc_trim`).

With the malloc settings `make bench` uses (freed memory kept, no fresh mapping per step), a process keeps the
peak of its working set. benchmarks/ppo.py and its Tunix peer at a real model's shape each peak at 9-14 GiB, so
each releases what it holds freed once its measurement is done, and runs one untimed iteration before the next
(the pages come back with faults there, not in a timed one). Imported by scripts of both environments: no
dependencies."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> bool:
    """Whether malloc_trim ran (glibc only)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
