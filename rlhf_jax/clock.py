"""Wall-clock laps taken inside one compiled program, so a program that fuses several phases (a PPO iteration:
rollout, then update) can still say how long each took.

`lap(values)` reads the host clock through a callback once every array of `values` is computed, and returns
(seconds since the previous lap, values): whatever is computed from the returned values starts only after the
clock was read. Every returned lap must reach the program's outputs: XLA drops the ordering of a lap whose
value is unused. The callback moves one scalar to the host; the cost is one device sync per lap.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback


class LapClock:
    def __init__(self) -> None:
        self._last = time.perf_counter()

    def _read(self, _after) -> np.ndarray:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return np.asarray(seconds, np.float32)

    def lap(self, values):
        values = jax.lax.optimization_barrier(values)  # every array of values is complete past this point
        after = sum(jnp.ravel(x)[0].astype(jnp.float32) for x in jax.tree.leaves(values) if _readable(x))
        seconds = io_callback(self._read, jax.ShapeDtypeStruct((), jnp.float32), after)
        return jax.lax.optimization_barrier((seconds, values))


def _readable(x) -> bool:
    """A leaf with a first element to read as a number (not empty, not a typed PRNG key)."""
    return x.size > 0 and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
