"""Every test sees 8 simulated CPU devices, so sharding is always exercised."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Many tests (and the CLI runs they start as subprocesses) compile the same programs: a compilation cache for this
# session only, so every session still compiles everything once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# configs/demo.yaml shortened to about a minute: the same stages and data, fewer examples and steps.
SHORT_DEMO = ["pipeline.task.task.corpus=1500", "pipeline.task.task.demonstrations=300",
              "pipeline.task.task.prompts=600", "pipeline.pretrain.train.steps=200", "pipeline.sft.train.steps=30",
              "pipeline.rm.train.epochs=3", "pipeline.ppo.train.steps=24", "pipeline.ppo.train.log_every=4",
              "pipeline.ppo.train.save_every=8", "pipeline.ppo.train.keep_checkpoints=3",
              "pipeline.ppo.ppo.samples_every=0"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The main job's pipeline, shortened, run once through the CLI: {"dir", "argv", "stderr", "report"}.
    Tests that change its files must leave them as they found them."""
    from cli_helpers import run_quietly
    from rlhf_jax import main as main_cli

    run_dir = tmp_path_factory.mktemp("demo") / "run"
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), f"run_dir={run_dir}",
            *SHORT_DEMO]
    rc, _, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-3000:]
    return {"dir": run_dir, "argv": argv, "stderr": err, "report": json.loads((run_dir / "report.json").read_text())}
