"""The environment of a run a test starts as a subprocess: this session's XLA flags (its fast-compile ones too,
so the subprocess compiles the programs the test process compiles, to the last bit) with a device count; and a
model's pass as one program (`jit_forward`)."""

import os

import jax

from rlhf_jax.models.transformer import forward


def subprocess_env(devices: int = 8) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])}



# `transformer.forward` compiled as one program: op by op, every primitive of the model compiles on its own (seconds
# per test). The model is static: it hashes by its settings.
jit_forward = jax.jit(forward, static_argnums=0)
