"""Several processes, one run: SFT, RM, PPO and GRPO with 2 processes x 4 CPU devices through launch/local.sh (the same
code path as a pod) against the 1-process 8-device run, a SIGTERM mid-stage, and a checkpoint saved by 2
processes resumed by 1 process on another mesh shape."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cli_helpers import run_quietly
from rlhf_jax import main as main_cli

ROOT = Path(__file__).resolve().parents[1]
# Sampling, losses and gradients agree to float32 rounding (reductions are split differently over processes).
RTOL = 1e-4


def _pipeline(demo: Path) -> dict:
    """sft -> rm -> ppo on the demo's datasets and SFT export, small, with a constant learning rate (so a run may
    be continued past its planned steps and still compare with a longer straight run)."""
    return {
        "seed": 0,
        "data": {"dir": str(demo / "data"), "max_prompt_tokens": 16, "max_response_tokens": 16},
        "sampling": {"max_new_tokens": 16, "temperature": 1.0, "batch_size": 16, "max_prompt_tokens": 16},
        "train": {"batch_size": 16, "log_every": 1, "save_every": 20, "eval_every": 0},
        "optim": {"lr": 1.0e-3, "schedule": "constant", "warmup_steps": 0},
        "pipeline": {
            # responses cut to 6 tokens: each process counts the cut examples of its own rows, the log their sum
            "sft": {"stage": "sft", "model": {"path": str(demo / "sft" / "export")},
                    "data": {"name": "demos", "max_response_tokens": 6}, "train": {"steps": 24}},
            "rm": {"stage": "rm", "model": {"path": str(demo / "sft" / "export")}, "data": {"name": "rankings"},
                   "train": {"steps": 4, "batch_size": 8}},
            "ppo": {"stage": "ppo", "model": {"path": str(demo / "sft" / "export")}, "data": {"name": "prompts"},
                    "train": {"steps": 2, "save_every": 1},
                    "ppo": {"reward_model": "{run_dir}/rm/export", "epochs": 1, "minibatches": 2}},
            # every process reads every prompt (cut ones counted once); the reward function is a host callback
            # inside the iteration
            "grpo": {"stage": "grpo", "model": {"path": str(demo / "sft" / "export")},
                     "data": {"name": "prompts", "max_prompt_tokens": 6}, "sampling": {"max_prompt_tokens": 6},
                     "train": {"steps": 2, "batch_size": 4},
                     "grpo": {"reward_function": "rlhf_jax.tasks.sentiment:gold", "group_size": 4,
                              "minibatches": 2}},
        },
    }


def _metrics(run_dir: Path, stage: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r or "score_mean" in r or "reward_mean" in r}


def _assert_close(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        for key, value in a[step].items():
            if key in ("time", "stage", "step") or key.endswith("_s"):
                continue
            if isinstance(value, int):  # counts (truncated_examples) are exact
                assert b[step][key] == value, (step, key)
            elif isinstance(value, float):
                assert b[step][key] == pytest.approx(value, rel=RTOL, abs=1e-5), (step, key)


def _local(n: int, config: Path, *overrides: str, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "DEVICES_PER_PROCESS": "4", "LOG_DIR": str(log_dir), "PY": sys.executable}
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), str(n), str(config), *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"local.sh did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def test_two_processes_match_one_survive_sigterm_and_resume_on_another_mesh(demo_run, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_pipeline(demo_run["dir"]), sort_keys=False))  # steps in order
    two, one = tmp_path / "two", tmp_path / "one"

    # 2 processes x 4 devices; SIGTERM to the launcher (passed on to both) once SFT is under way.
    proc = _local(2, config, f"run_dir={two}", log_dir=tmp_path)
    metrics = two / "sft" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, _finish(proc)[1][-3000:]
        assert time.monotonic() < deadline, "sft did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 4, out[-3000:]  # interrupted after saving (main.py's documented exit status)
    saved = sorted(int(p.name) for p in (two / "sft" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 3 <= saved[-1] < 24, out[-3000:]
    assert f"interrupted at step {saved[-1]}" in out

    # The same command resumes, and runs the rest of the pipeline.
    rc, out = _finish(_local(2, config, f"run_dir={two}", log_dir=tmp_path))
    assert rc == 0, out[-3000:]
    assert f"resumed from {two / 'sft' / 'checkpoints'} at step {saved[-1]}" in out

    # 1 process x 8 devices, straight through, PPO one iteration longer.
    rc, _, err = run_quietly(main_cli.main, ["--config", config, f"run_dir={one}", "pipeline.ppo.train.steps=3"])
    assert rc == 0, err[-3000:]
    assert _metrics(one, "sft")[24]["truncated_examples"] > 0
    _assert_close(_metrics(one, "sft"), _metrics(two, "sft"), range(1, 25))
    _assert_close(_metrics(one, "rm"), _metrics(two, "rm"), range(1, 5))
    _assert_close(_metrics(one, "ppo"), _metrics(two, "ppo"), range(1, 3))
    assert _metrics(two, "grpo")[2]["reward_std"] > 0  # the function scored the responses
    assert _metrics(one, "grpo")[2]["truncated_examples"] > 0
    _assert_close(_metrics(one, "grpo"), _metrics(two, "grpo"), range(1, 3))

    # The PPO checkpoint the 2 processes saved, continued by 1 process on a (2, 4, 1) mesh for one more iteration.
    stage_config = tmp_path / "ppo.yaml"
    stage_config.write_text(yaml.safe_dump(json.loads((two / "ppo" / "config.json").read_text())))
    rc, _, err = run_quietly(main_cli.main, ["--config", stage_config, "train.steps=3", "mesh.shape=[2,4,1]"])
    assert rc == 0, err[-3000:]
    assert f"resumed from {two / 'ppo' / 'checkpoints'} at step 2" in err
    _assert_close(_metrics(one, "ppo"), _metrics(two, "ppo"), [3])


@pytest.mark.parametrize("shape, axes", [("[1,1,-1]", "[data,fsdp,tensor]"), ("[2,4,1]", "[tensor,data,fsdp]")],
                         ids=["tensor_over_both", "batch_blocks_interleaved"])
def test_a_mesh_whose_batch_blocks_do_not_follow_the_processes_is_one_line(tmp_path, shape, axes):
    """2 processes x 4 devices: a mesh whose data-parallel axes do not split over the processes in order (one
    batch block over both, or process 1 holding the same blocks as process 0) would feed each device rows of
    another process; every process stops before loading a model, in one line."""
    proc = _local(2, ROOT / "configs" / "generate.yaml", f"run_dir={tmp_path / 'run'}", f"mesh.shape={shape}",
                  f"mesh.axes={axes}", log_dir=tmp_path)
    rc, out = _finish(proc, timeout=200)
    assert rc == 2, out[-3000:]
    # process 0 writes to the launcher's output (which ends with the tail of process 1's log), process 1 to its log
    proc1 = (tmp_path / "rlhf_jax_local.proc1.log").read_text()
    errors = [[line for line in text.splitlines() if line.startswith("error: ")] for text in (out, proc1)]
    assert errors[0] and len(errors[1]) == 1 and all(
        "with 2 processes every process must hold its own block of each batch" in e for e in errors[0] + errors[1]), \
        out[-3000:]
