"""XLA's persistent compilation cache: a program (one per model, step and batch shape) compiles once per machine
and later runs read it back, which removes most of a restart's or a rerun's start-up time."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from rlhf_jax.errors import UserError, os_reason

MAX_BYTES = 10 * 2**30  # beyond it the least recently used programs go: every new shape and config adds some


def use(directory: str, key: str = "runtime.compile_cache") -> None:
    """Cache compiled programs in `directory` (created if missing), at most MAX_BYTES of them; empty: off.
    $JAX_COMPILATION_CACHE_DIR and $JAX_COMPILATION_CACHE_MAX_SIZE, when set, are jax's own settings and win."""
    if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}={directory}: cannot create ({os_reason(e)}); set it to a writable directory or "
                        f"empty to compile without a cache") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
