"""CPU runs keep freed memory in the process: a step's scratch buffers are reused instead of being mapped afresh
from the kernel (page faults) every step; the user's own malloc settings and accelerator hosts are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from rlhf_jax.runtime import cpu_memory

# Page faults of malloc-ing, touching and freeing 200 MB ten times (as XLA's CPU client does with a step's
# scratch buffers), after the first time.
PROGRAM = """
import ctypes, resource, sys
from rlhf_jax.runtime import cpu_memory
print(cpu_memory.keep_freed_memory({"JAX_PLATFORMS": "cpu"}) if sys.argv[1] == "keep" else False)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def once(n=200 << 20):
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_scratch_memory_is_reused_instead_of_faulted_in_again():
    (kept, faults_kept), (_, faults_default) = _faults("keep"), _faults("default")
    assert kept
    assert faults_default > 10 * 40_000, faults_default  # 200 MB = about 49k pages, mapped anew each time
    assert faults_kept < faults_default / 20, (faults_kept, faults_default)


def test_the_users_settings_and_accelerator_hosts_are_left_alone():
    assert not cpu_memory.keep_freed_memory({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"})
    assert not cpu_memory.keep_freed_memory({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not cpu_memory.keep_freed_memory({"JAX_PLATFORMS": "cuda"})
