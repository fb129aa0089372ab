"""Wall-clock laps taken inside one compiled program, so a program that fuses several phases (a PPO iteration:
rollout, then update) can still say how long each took.

`lap(values)` reads the host clock through a callback once every array of `values` is complete, and returns
(seconds since the previous lap, values). The ordering is carried by data, not by scheduling hints (XLA may run
independent work in any order): the callback's operand is a full reduction of every array of `values` (keep
them small), and with `gate` the returned values pass through a zero the callback returns, so whatever is
computed from them starts only after the clock was read. Each lap moves two scalars and costs one device sync.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

_SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


class LapClock:
    def __init__(self) -> None:
        self._last = time.perf_counter()

    def _read(self, _after) -> tuple[np.ndarray, np.ndarray]:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return np.asarray(seconds, np.float32), np.zeros((), np.float32)

    def lap(self, values, gate: bool = True):
        after = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(values) if _readable(x))
        seconds, zero = io_callback(self._read, (_SCALAR, _SCALAR), after)
        if gate:
            values = jax.tree.map(lambda x: _plus(x, zero) if _readable(x) else x, values)
        return seconds, values


def _readable(x) -> bool:
    """A leaf that holds numbers (not empty, not a typed PRNG key)."""
    return x.size > 0 and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plus(x: jax.Array, zero: jax.Array) -> jax.Array:
    """x, computed only once `zero` (opaque to the compiler: it comes from the host) is known."""
    if x.dtype == jnp.bool_:
        return x | (zero != 0)
    return x + zero.astype(x.dtype)
