"""The package layering of pyproject.toml's [tool.importlinter] contracts holds: imports only go
down the layers (main and the CLIs > plan > pipeline > stages > eval | tasks | label > rl > training > data > models >
config > typed_yaml > runtime > errors), rl/ never imports the config, stages do not import each other and no siblings
import each other in a cycle. The public entry points still run as `python -m`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in requirements-dev.txt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("module", ["rlhf_jax.main", "rlhf_jax.generate", "rlhf_jax.convert", "rlhf_jax.evaluate",
                                    "rlhf_jax.data", "rlhf_jax.label"])
def test_public_entry_points_run_as_modules(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout + proc.stderr
