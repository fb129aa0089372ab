"""Programs the tests compile themselves, with XLA's backend optimisation off: an oracle test runs its program
once or twice on tiny shapes, so compiling takes seconds and running milliseconds. The same computations, in
fewer compile seconds; the stages the tests run compile as a user's run does (a resumed run is compared bitwise
with a straight one, and optimisation levels differ in the last bits)."""

import functools

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0}

jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
