"""Files and run directories that a command must not damage: convert --overwrite replaces only a model
directory, two runs never share a run_dir at once (an OS lock a killed run does not leave behind), a rerun of a
finished run keeps its summary, pipeline step names stay inside run_dir, `{run_dir}/NAME` references name steps
that have run by then, a moved pipeline run_dir keeps its finished steps, generate.output never replaces an
unrelated file, the launchers validate the config before they start or create anything, and convert says when a
model has no tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_jax import convert as convert_cli
from rlhf_jax import pipeline
from rlhf_jax import main as main_cli
from rlhf_jax.typed_yaml import ConfigError
from rlhf_jax.models import hf
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.runtime import fsio
from rlhf_jax.training.loop import TrainingLoop

from cli_helpers import run_quietly

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _one_error(rc: int, err: str, *fragments) -> str:
    """A user error: exit 2 and one `error: ...` line naming each fragment."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def hf_model(workdir) -> Path:
    return build_tiny_model(workdir / "hf", seed=0, vocab_size=300)


# ------------------------------------------------------------------------------------------------ convert


def test_convert_overwrite_refuses_a_directory_without_a_model(hf_model, tmp_path):
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me\n")
    (home / "src" / "config.json").write_text("{}")  # a config.json deeper down is no model either
    before = _files(home)
    rc, _, err = run_quietly(convert_cli.main, ["--from-hf", hf_model, "--out", home, "--overwrite"])
    _one_error(rc, err, f"--out {home}", "holds files but no model")
    assert _files(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no temporary directory beside it


def test_convert_overwrite_replaces_an_empty_directory_and_a_model(hf_model, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    rc, _, err = run_quietly(convert_cli.main, ["--from-hf", hf_model, "--out", out, "--overwrite"])
    assert rc == 0 and (out / "model.json").is_file(), err
    (out / "stale.txt").write_text("from before")
    rc, _, err = run_quietly(convert_cli.main, ["--from-hf", hf_model, "--out", out, "--overwrite"])
    assert rc == 0 and not (out / "stale.txt").exists(), err  # a model directory is replaced as a whole
    export = tmp_path / "export"
    for _ in range(2):  # an HF export (config.json + safetensors) is a model too
        rc, _, err = run_quietly(convert_cli.main, ["--to-hf", "--checkpoint", out, "--out", export, "--overwrite"])
        assert rc == 0, err


def test_convert_warns_when_the_model_has_no_tokenizer(hf_model, tmp_path):
    bare = shutil.copytree(hf_model, tmp_path / "bare", ignore=shutil.ignore_patterns(*hf.TOKENIZER_FILES))
    rc, _, err = run_quietly(convert_cli.main, ["--from-hf", bare, "--out", tmp_path / "ckpt"])
    assert rc == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "has no tokenizer files" in warning[0] and str(tmp_path / "ckpt") in warning[0]
    assert "generation and training refuse it" in warning[0]
    rc, _, err = run_quietly(convert_cli.main, ["--from-hf", hf_model, "--out", tmp_path / "ckpt2"])
    assert rc == 0 and "warning" not in err  # with a tokenizer: nothing to say


# ------------------------------------------------------------------------------------------------ run_dir lock

GENERATE = """
run_dir: {run_dir}
seed: 0
sampling: {{max_new_tokens: 2, batch_size: 8}}
pipeline:
  first:
    stage: generate
    generate: {{prompt_file: "{prompts}", output: "{{run_dir}}/first.jsonl"}}
  second:
    stage: generate
    generate: {{prompt_file: "{{run_dir}}/first/prompts.txt"}}
"""


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there\nOnce upon a time\n")
    return path


def _pipeline(tmp_path, prompts, run_dir, text=GENERATE, name="pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(run_dir=run_dir, prompts=prompts))
    return path


def test_a_run_dir_in_use_is_refused_for_a_pipeline_and_a_single_stage(tmp_path, prompts):
    run_dir, stage_dir = tmp_path / "run", tmp_path / "run" / "gen"
    stage_dir.mkdir(parents=True)
    with fsio.run_dir_lock(run_dir), fsio.run_dir_lock(stage_dir):
        before = _files(run_dir)
        rc, _, err = run_quietly(main_cli.main, ["--config", _pipeline(tmp_path, prompts, run_dir)])
        _one_error(rc, err, f"run_dir={run_dir}: in use by pid {os.getpid()}")
        rc, _, err = run_quietly(main_cli.main, ["--config", ROOT / "configs" / "generate.yaml",
                                                 f"run_dir={stage_dir}"])
        _one_error(rc, err, f"run_dir={stage_dir}: in use by pid {os.getpid()}")
        assert _files(run_dir) == before


def test_a_pipeline_run_dir_that_is_a_file_is_one_line(tmp_path, prompts):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    rc, _, err = run_quietly(main_cli.main, ["--config", _pipeline(tmp_path, prompts, a_file)])
    _one_error(rc, err, f"run_dir={a_file}: is a file, expected a directory")
    assert a_file.read_text() == "x"


def test_a_pipeline_stopped_by_a_user_error_leaves_no_run_dir_nor_the_parents_made_for_it(tmp_path, prompts):
    run_dir = tmp_path / "runs" / "pipe"
    rc, _, err = run_quietly(main_cli.main, ["--config", _pipeline(tmp_path, prompts, run_dir),
                                             "model.path=/nonexistent/model"])
    assert rc == 2 and "/nonexistent/model" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_stage_stopped_by_a_user_error_leaves_no_run_dir_nor_the_parents_made_for_it(tmp_path, prompts):
    run_dir = tmp_path / "runs" / "gen"
    rc, _, err = run_quietly(main_cli.main, ["--config", ROOT / "configs" / "generate.yaml", f"run_dir={run_dir}",
                                             f"generate.prompt_file={prompts}", "model.path=/nonexistent/model"])
    assert rc == 2 and "/nonexistent/model" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_pipeline_whose_later_step_stops_on_a_user_error_keeps_what_the_earlier_made(tmp_path, prompts):
    run_dir = tmp_path / "run"
    rc, _, err = run_quietly(main_cli.main, ["--config", _pipeline(tmp_path, prompts, run_dir)])
    assert rc == 2 and err.strip().splitlines()[-1] == f"error: {run_dir}/first/prompts.txt: file not found", err
    assert "[1/2] first: done" in err and (run_dir / "first").is_dir() and (run_dir / "first.jsonl").exists()


def test_every_step_of_a_pipeline_is_compared_between_processes_before_the_first_runs(tmp_path, prompts,
                                                                                       monkeypatch):
    """Processes given other settings for a later step must stop before the first step runs, not after it."""
    from rlhf_jax.runtime import distributed

    compared = []

    def check_same(settings, what):
        compared.append(settings)
        raise fsio.UserError("compared")

    monkeypatch.setattr(distributed, "check_same", check_same)
    rc, _, err = run_quietly(main_cli.main, ["--config", _pipeline(tmp_path, prompts, tmp_path / "run"),
                                             "pipeline.second.seed=7"])
    _one_error(rc, err, "compared")
    assert compared[0]["pipeline.first.seed"] == 0 and compared[0]["pipeline.second.seed"] == 7
    assert "pipeline.first.distributed.process_id" not in compared[0]  # each process's own


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlhf_jax.runtime import fsio\n"
                               "with fsio.run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n"
                               "    time.sleep(60)\n", str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(fsio.UserError, match=f"in use by pid {holder.pid} on "):
            with fsio.run_dir_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with fsio.run_dir_lock(run_dir):  # the OS dropped the killed holder's lock
        pass


def test_a_finished_run_run_again_reports_what_it_logged_at_its_end(tmp_path):
    """A training loop with nothing left to run reports the metrics logged at the last step, so the stage's
    summary.json keeps its loss and eval results instead of being rewritten without them."""
    lines = [{"stage": "sft", "step": 4, "time": 1.0, "loss": 2.0},
             {"stage": "sft", "step": 5, "time": 2.0, "loss": 1.5, "tokens_per_s": 10.0},
             {"stage": "sft", "step": 5, "time": 3.0, "eval_loss": 1.75},
             {"stage": "rm", "step": 5, "time": 4.0, "loss": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"cut off')
    run = SimpleNamespace(cfg=SimpleNamespace(seed=0, train=None), run_dir=tmp_path, stage="sft", facts={})
    with TrainingLoop(run, 5, 5, "sft") as loop:
        assert list(loop) == []
    assert loop.last == {"loss": 1.5, "tokens_per_s": 10.0, "eval_loss": 1.75}


# ------------------------------------------------------------------------------------------------ pipeline config


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "two words"])
def test_step_names_are_simple_names(tmp_path, prompts, name):
    text = GENERATE.replace("  second:", f"  {json.dumps(name)}:")
    path = _pipeline(tmp_path, prompts, tmp_path / "run", text)
    with pytest.raises(ConfigError, match=re.escape(f"pipeline: step name {name!r}: expected a simple name")):
        pipeline.load(str(path))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    _one_error(rc, err, repr(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.yaml", "prompts.txt"]


@pytest.mark.parametrize("override, fragment", [
    ("pipeline.second.generate.prompt_file={run_dir}/frist/prompts.txt",
     "pipeline.second.generate.prompt_file: '{run_dir}/frist/prompts.txt' names step 'frist', which this pipeline "
     "does not have (steps: first, second)"),
    ("pipeline.first.generate.prompt_file={run_dir}/second/prompts.txt",
     "pipeline.first.generate.prompt_file: '{run_dir}/second/prompts.txt' names step 'second', which runs after "
     "first"),
    ("model.path={run_dir}/third/export",
     "model.path (shared by every step): '{run_dir}/third/export' names step 'third', which this pipeline does "
     "not have"),
])
def test_a_reference_to_a_missing_or_later_step_fails_before_the_first_step(tmp_path, prompts, override, fragment):
    path = _pipeline(tmp_path, prompts, tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        pipeline.load(str(path), [override])
    for extra in ([], ["--dry-run"], ["--check"]):
        rc, _, err = run_quietly(main_cli.main, ["--config", path, override, *extra])
        _one_error(rc, err, fragment)
    assert not (tmp_path / "run").exists()


def test_references_to_this_or_earlier_steps_and_to_datasets_are_fine(tmp_path, prompts):
    text = GENERATE.replace("pipeline:", 'data: {{dir: "{{run_dir}}/data"}}\npipeline:') + \
        '    eval: {{runs: ["{{run_dir}}/first", "{{run_dir}}/second"]}}\n'
    _, steps = pipeline.load(str(_pipeline(tmp_path, prompts, tmp_path / "run", text)),
                             ["eval.prompts={run_dir}/data/prompts:eval"])
    assert [s.name for s in steps] == ["first", "second"]


def test_a_moved_pipeline_run_dir_keeps_its_finished_steps(tmp_path, prompts):
    old, new = tmp_path / "old", tmp_path / "moved" / "new"
    old.mkdir()
    path = _pipeline(tmp_path, prompts, old)
    first = _pipeline(tmp_path, prompts, old, GENERATE.split("  second:")[0], "first.yaml")
    rc, _, err = run_quietly(main_cli.main, ["--config", first])
    assert rc == 0, err[-2000:]
    shutil.copy(prompts, old / "first" / "prompts.txt")  # what the second step reads from the first one's dir
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[2/2] second: done" in err, err[-2000:]
    new.parent.mkdir()
    old.rename(new)
    rc, _, err = run_quietly(main_cli.main, ["--config", path, f"run_dir={new}"])
    assert rc == 0, err[-2000:]
    assert "[1/2] first: finished earlier, skipped" in err and "[2/2] second: finished earlier, skipped" in err
    summaries = json.loads((new / "pipeline.json").read_text())["summaries"]
    assert summaries[0]["output"] == f"{new}/first.jsonl"  # the paths of the run_dir as it is now
    rc, _, err = run_quietly(main_cli.main, ["--config", path, f"run_dir={new}", "pipeline.second.seed=1"])
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: pipeline.second: finished earlier with other settings (seed: 0 -> 1)")


# ------------------------------------------------------------------------------------------------ generate.output


def test_generate_output_never_replaces_an_unrelated_file(tmp_path, prompts):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own work\n")
    argv = ["--config", ROOT / "configs" / "generate.yaml", f"generate.prompt_file={prompts}",
            "sampling.max_new_tokens=2"]
    rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'a'}", f"generate.output={mine}"])
    _one_error(rc, err, f"generate.output={mine}: already exists")
    assert mine.read_text() == "my own work\n" and not (tmp_path / "a").exists()
    out = tmp_path / "samples.jsonl"
    for _ in range(2):  # the same run, run again, replaces its own output
        rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'b'}", f"generate.output={out}"])
        assert rc == 0, err[-2000:]
        assert len(out.read_text().splitlines()) == 2
    rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'b'}", "model.path=/nonexistent/model",
                                             f"generate.output={tmp_path / 'other.jsonl'}"])
    assert rc == 2, err[-2000:]  # a run that failed with another output...
    rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'b'}", f"generate.output={out}"])
    assert rc == 0, err[-2000:]  # ...left the earlier output this run_dir's own
    rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'c'}", f"generate.output={out}"])
    _one_error(rc, err, "is not this run_dir's earlier output")  # another run's output
    rc, _, err = run_quietly(main_cli.main, [*argv, f"run_dir={tmp_path / 'b'}", f"generate.output={mine}"])
    _one_error(rc, err, f"generate.output={mine}: already exists")  # a run_dir with an output of its own elsewhere
    assert mine.read_text() == "my own work\n"


# ------------------------------------------------------------------------------------------------ launchers


def test_main_check_validates_without_running(tmp_path):
    rc, out, err = run_quietly(main_cli.main, ["--help"])
    assert rc == 0 and "--check" in out
    rc, out, err = run_quietly(main_cli.main, ["--config", ROOT / "configs" / "demo.yaml", "--check",
                                               f"run_dir={tmp_path / 'run'}"])
    assert rc == 0 and "config OK: task, pretrain (sft), sft, label, rm, dpo, ppo, eval" in out, err
    assert not (tmp_path / "run").exists()


def _launcher_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_", "PY"))}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"  # records that it was called at all
    gcloud.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {tmp_path / 'gcloud.log'}\n")
    gcloud.chmod(0o755)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
            "SLURM_NNODES": "2"}


@pytest.mark.parametrize("launcher", [
    ["launch/local.sh", "--dry-run", "2", "configs/sft.yaml", "train.stepz=1"],
    ["bash", "launch/gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml", "train.stepz=1"],
    ["launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--config", "configs/sft.yaml", "--",
     "train.stepz=1"],
    ["launch/tpu_pod.sh", "--name", "n", "--zone", "z", "--config", "configs/sft.yaml", "--", "train.stepz=1"],
], ids=["local", "slurm", "tpu_pod_dry_run", "tpu_pod"])
def test_launchers_stop_on_a_bad_override_before_anything(tmp_path, launcher):
    out = subprocess.run(launcher, cwd=ROOT, env=_launcher_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.strip().splitlines()[-1] == "error: unknown key 'train.stepz' (did you mean 'train.steps'?)"
    assert not (tmp_path / "gcloud.log").exists()  # no slice described, created or run on


def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """The data is synced before the rename (else a crash can leave the new name on an empty file) and the
    directory after it (else the rename itself can be lost): a pipeline's done-marker must never be half there."""
    import os
    import stat

    synced = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: synced.append("rename") or real_replace(*a))
    fsio.write_json_atomically(tmp_path / "done.json", {"step": 1})
    assert synced == [False, "rename", True]
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]


def test_a_summary_is_the_same_from_the_live_metrics_and_from_metrics_jsonl(tmp_path, capsys):
    """Counts are ints in a live run and may read back as floats: the summary a later step depends on agrees."""
    from rlhf_jax.training.run import write_summary

    live = write_summary(tmp_path, "sft", 5, {}, {"loss": 1.5, "truncated_examples": 242, "flag": True})
    again = write_summary(tmp_path, "sft", 5, {}, {"loss": 1.5, "truncated_examples": 242.0})
    assert json.dumps(live) == json.dumps(again) and live["truncated_examples"] == 242.0 and "flag" not in live


def test_removing_a_temporary_directory_the_file_system_cannot_name_hides_no_error(tmp_path):
    """A cleanup in a `finally` after a name too long for the file system: it must return, not raise over the
    error that brought it there."""
    fsio.remove_dir(tmp_path / ("a" * 300))
    made = tmp_path / "tmp"
    (made / "inner").mkdir(parents=True)
    fsio.remove_dir(made)
    assert not made.exists()
