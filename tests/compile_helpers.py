"""The environment of a run a test starts as a subprocess: this session's XLA flags (its fast-compile ones too,
so the subprocess compiles the programs the test process compiles, to the last bit) with a device count."""

import os


def subprocess_env(devices: int = 8) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])}
