#!/usr/bin/env bash
# Run one stage on this host, on every local accelerator (or CPU):
#   launch/single_host.sh configs/demo.yaml [section.key=value ...]
# Multi-host pod and cluster launchers build on this entry point.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/single_host.sh CONFIG [section.key=value ...]}
shift
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# Let XLA grow GPU memory on demand rather than reserving 75% up front (the sampler and trainer share a device).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "$PY" -m rlhf_jax.main --config "$config" "$@"
