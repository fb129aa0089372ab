"""How every benchmark hands over its result: printed as JSON and, with --out, written whole (a temporary file
renamed over the target: an interrupted run leaves the previous results file, never half of one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rlhf_jax

from rlhf_jax.runtime.fsio import write_text_atomically  # noqa: E402

# The environment settings that change what a CPU run measures (allocator, XLA, platform), kept with its result.
MEASURED_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def measured_env() -> dict:
    return {k: os.environ[k] for k in MEASURED_ENV if k in os.environ}


def emit(result: dict, out: str | None) -> None:
    """Print `result` as JSON and, when `out` is given, write it there."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if out:
        write_text_atomically(Path(out), text + "\n")
