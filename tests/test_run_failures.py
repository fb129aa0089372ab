"""Runs that go wrong end in one line and lose nothing: divergence (exit 3), corrupt checkpoints, resuming with
another config, failing saves, and a run_dir that cannot be used. (Signals are in test_train.py, beside the
uninterrupted run they are compared with.)"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.models.checkpoint import TrainCheckpoints
from rlhf_jax.models.tiny import build_tiny_model

from cli_helpers import run_quietly as _quiet

# A restore that fails leaves Orbax's pending read coroutines unawaited; Python reports them at collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish", "bird", "star"]


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1].split("\r")[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("failures")


@pytest.fixture(scope="module")
def tiny(workdir) -> Path:
    return build_tiny_model(workdir / "tiny", seed=0)


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        words = " ".join(rng.sample(WORDS, 3))
        rows.append({"prompt": f"Repeat: {words}", "response": f" {words}"})
    src = workdir / "rep.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = workdir / "data"
    rc, _, err = _quiet(data_cli.main, ["--format", "jsonl_sft", "--input", src, "--data-dir", root, "--name", "rep"])
    assert rc == 0, err
    return root


def _args(tiny: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["stage=sft", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=rep",
            "data.max_prompt_tokens=16", "data.max_response_tokens=8", "train.batch_size=8", "train.log_every=1",
            "train.save_every=1", "train.keep_checkpoints=5", "optim.lr=1e-3", "data.eval_split=none", *extra]


def _train(tiny, data_dir, run_dir, *extra) -> tuple[int, str, str]:
    return _quiet(main_cli.main, _args(tiny, data_dir, run_dir, *extra))


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------------------ divergence


def test_divergence_stops_with_exit_3_and_saves_nothing_non_finite(tiny, data_dir, workdir):
    """optim.lr=1e9: the first step's update is finite but huge, so step 1 is saved; the loss of a later step
    is not finite, and the run stops there with exit 3, naming the step, with no export."""
    run_dir = workdir / "diverged"
    rc, out, err = _train(tiny, data_dir, run_dir, "train.steps=8", "optim.lr=1e9", "optim.grad_clip=0",
                          "optim.warmup_steps=0", "optim.schedule=constant")
    assert rc == 3, err
    line = _last_line(err)
    assert line.startswith("error: diverged at step "), line
    step = int(line.split("step ")[1].split(":")[0])
    assert 1 < step <= 8 and "try a lower optim.lr" in line
    assert out == "" and not (run_dir / "export").exists() and not (run_dir / "summary.json").exists()
    saved = _steps(run_dir)
    assert saved and max(saved) < step, saved
    ckpts = TrainCheckpoints(run_dir / "checkpoints", 5)
    for s in saved:
        restored = ckpts.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state)), s
    ckpts.close()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics)  # the non-finite step is reported, not logged


def test_a_save_keeps_the_loop_facts_of_its_step_on_slow_storage(tmp_path, monkeypatch):
    """Orbax writes the JSON items in a background thread; the training loop meanwhile goes on and updates its
    facts (truncated examples, best eval loss): the checkpoint holds those of its own step."""
    import asyncio

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    slow_write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def slow(self, item, directory):
        await asyncio.sleep(0.5)
        return await slow_write(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", slow)
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", 2)
    facts, data = {"truncated_examples": 800}, {"states": [{"position": 5}]}
    state = {"w": np.zeros(3, np.float32)}
    ckpts.save(50, state, data, facts, {"stage": "sft"})
    facts["truncated_examples"], data["states"][0]["position"] = 960, 6  # the loop's next steps
    ckpts.wait()
    _, stored_data, loop = ckpts.restore(50, jax.tree.map(jnp.asarray, state))
    assert loop == {"truncated_examples": 800} and stored_data == {"states": [{"position": 5}]}
    ckpts.close()


@pytest.mark.parametrize("keep, kept", [
    (2, [[10], [20, 10], [30, 20], [33, 30], [40, 30]]),
    (1, [[10], [20], [30], [33], [40]]),
])
def test_checkpoints_kept_are_the_newest_and_the_newest_of_the_cadence(tmp_path, keep, kept):
    """train.keep_checkpoints in all: the newest complete one always, then the cadence's newest; a stop's own
    checkpoint (33, off the cadence of 10) goes once a newer one is complete."""
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", keep, save_every=10)
    state = {"w": np.zeros(3, np.float32)}
    for step, expected in zip((10, 20, 30, 33, 40), kept):
        ckpts.save(step, state, {}, {}, {"stage": "sft"})
        ckpts.wait()
        assert ckpts.steps() == expected, (step, ckpts.steps())
    ckpts.close()


def test_export_refuses_non_finite_params(tmp_path):
    from rlhf_jax.errors import DivergedError
    from rlhf_jax.training import state as training_state

    with pytest.raises(DivergedError, match="non-finite values; .* was not written"):
        training_state.export(tmp_path / "export", {"w": np.array([1.0, np.nan])}, None, None, chat_template=False)
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------------------------ corrupt


def _truncate_state_files(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64 and "ocdbt" in str(path.parent):
            path.write_bytes(path.read_bytes()[:16])


@pytest.mark.parametrize("damage", ["truncated", "missing_item", "missing_state_metadata"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(damage, tiny, data_dir, workdir):
    run_dir = workdir / f"corrupt_{damage}"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=3")
    assert rc == 0, err
    assert _steps(run_dir) == [1, 2, 3]
    if damage == "truncated":
        _truncate_state_files(run_dir / "checkpoints" / "3")
    elif damage == "missing_item":
        import shutil

        shutil.rmtree(run_dir / "checkpoints" / "3" / "data")
    else:  # a directory copied in part (a rename on object storage is a copy then a delete)
        (run_dir / "checkpoints" / "3" / "state" / "_METADATA").unlink()
    rc, out, err = _train(tiny, data_dir, run_dir, "train.steps=5")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint step 3")]
    assert len(warnings) == 1 and "cannot be restored" in warnings[0] and "falling back" in warnings[0], err
    if damage == "truncated":  # TensorStore's reason, naming the file, not Orbax's wrapper naming slices and a spec
        assert "Error reading" in warnings[0] and "TensorStore details" not in warnings[0], warnings[0]
    assert "resumed from" in err and "at step 2" in err
    assert (run_dir / "unrestorable_checkpoints" / "step_3").is_dir()
    assert _steps(run_dir) == [1, 2, 3, 4, 5]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 5
    assert "Traceback" not in err


def test_a_save_killed_mid_write_is_removed_in_words_on_resume(tiny, data_dir, workdir, caplog):
    """Orbax leaves the step under its temporary name and removed it on saving that step again with a raw
    `WARNING:absl:Attempted to create temporary directory ...` line."""
    run_dir = workdir / "killed_mid_save"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 0, err
    unfinished = run_dir / "checkpoints" / "2.orbax-checkpoint-tmp"
    (run_dir / "checkpoints" / "2").rename(unfinished)  # as a kill -9 during its save leaves it
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=3")
    assert rc == 0 and f"note: removing {unfinished}: a checkpoint whose save never finished" in err, err
    assert "resumed from" in err and "at step 1" in err
    assert not unfinished.exists() and _steps(run_dir) == [1, 2, 3]
    assert not [r for r in caplog.records if "Attempted to create temporary directory" in r.getMessage()]


def test_no_restorable_checkpoint_is_one_line_naming_the_directory(tiny, data_dir, workdir):
    run_dir = workdir / "all_corrupt"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 0, err
    for step in (1, 2):
        _truncate_state_files(run_dir / "checkpoints" / str(step))
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=4")
    assert rc == 2 and "Traceback" not in err
    assert _last_line(err) == f"error: {(run_dir / 'checkpoints').resolve()}: no checkpoint can be restored " \
                              "(newest: step 2); move the directory away to start over"
    assert _steps(run_dir) == [1, 2]  # nothing moved or deleted


# ------------------------------------------------------------------------------------------------ mismatch


def test_resume_refuses_another_model_and_allows_harmless_changes(tiny, data_dir, workdir):
    run_dir = workdir / "mismatch"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 0, err
    config_before = (run_dir / "config.json").read_text()

    other = build_tiny_model(workdir / "tiny_gpt2", seed=0, family="gpt2")
    rc, _, err = _quiet(main_cli.main, [*_args(tiny, data_dir, run_dir, "train.steps=4"), f"model.path={other}"])
    assert rc == 2 and "Traceback" not in err
    line = _last_line(err)
    assert line.startswith(f"error: cannot resume {(run_dir / 'checkpoints').resolve()} (step 2) with this config:")
    assert "model.path=" in line and "parameter layer_0/" in line
    assert "use the checkpoint's values or a new run_dir" in line
    assert (run_dir / "config.json").read_text() == config_before  # not rewritten before the checks pass

    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=3", "optim.lr=2e-3")
    assert rc == 0, err
    warning = next(x for x in err.splitlines() if x.startswith("warning: resuming with changed settings"))
    assert "optim.lr=0.001 (now 0.002)" in warning and "train.steps=2 (now 3)" in warning
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 3


def test_a_checkpoint_from_before_a_key_existed_resumes_without_a_word_of_it(tiny, data_dir, workdir, monkeypatch):
    """A key added to the config since the checkpoint was saved is absent from its stored config: at its default
    it is no change (a refused key listed as one stopped every such resume)."""
    from rlhf_jax.models.checkpoint import TrainCheckpoints as Checkpoints

    run_dir = workdir / "older"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 0, err
    stored = Checkpoints.stored

    def from_before(self, step):
        config, shapes, facts = stored(self, step)
        del config["data"]["chat_template"]  # refused when changed; default True
        return config, shapes, facts

    monkeypatch.setattr(Checkpoints, "stored", from_before)
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=3")
    assert rc == 0 and "resumed from" in err and "chat_template" not in err, err


@pytest.mark.parametrize("reading", ["stored", "a_shard"])
def test_a_resume_short_of_memory_stops_in_one_line_and_keeps_the_checkpoint(tiny, data_dir, workdir, monkeypatch,
                                                                            reading):
    """A memory error while reading a checkpoint was taken for damage: the sound step was moved aside. Orbax wraps
    an array read's failure in an Exception of its own, with the MemoryError as its cause."""
    from orbax.checkpoint._src.serialization import serialization

    from rlhf_jax.models.checkpoint import TrainCheckpoints

    run_dir = workdir / f"short_of_memory_{reading}"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 0, err

    def short_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 297. MiB for an array")

    if reading == "stored":
        monkeypatch.setattr(TrainCheckpoints, "stored", short_of_memory)
    else:
        async def read_shard(*args, **kwargs):  # of every array of every step
            short_of_memory()

        monkeypatch.setattr(serialization, "_read_shard", read_shard)
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=3")
    assert rc == 5 and _last_line(err).startswith("error: out of host memory (Unable to allocate 297. MiB"), err
    assert _steps(run_dir) == [1, 2] and not (run_dir / "unrestorable_checkpoints").exists()
    assert "cannot be restored" not in err
    if reading == "a_shard":  # the evaluator's read of a run's params: the host's error, not an unrestorable step
        import orbax.checkpoint as ocp

        from rlhf_jax.models.checkpoint import restore_params

        def wrapped(*args, **kwargs):
            try:
                short_of_memory()
            except MemoryError as e:
                raise Exception("Encountered error while reading array index: (slice(0, 4, 1),)") from e

        monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", wrapped)
        with pytest.raises(MemoryError, match="Unable to allocate 297. MiB"):
            restore_params(run_dir / "checkpoints" / "2" / "state", ("params",))


def _nested(key: str, value) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _value_at(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


# What a resume must refuse to change: written out here, so that dropping one from resume.REFUSED fails
MUST_REFUSE = ("stage", "seed", "model.path", "model.param_dtype", "data.dir", "data.name", "data.train_split",
               "data.pack", "data.max_responses", "train.batch_size", "ppo.reward_model", "ppo.value_model",
               "grpo.reward_model", "grpo.reward_function", "rloo.reward_model", "rloo.reward_function",
               "ppo.reference", "dpo.reference", "grpo.reference", "rloo.reference", "lora.alpha", "lora.rank",
               "lora.targets", "lora.also_train", "ppo.ptx_dataset", "ppo.ptx_batch_size", "data.chat_template")


@pytest.mark.parametrize("key", MUST_REFUSE)
def test_every_refused_key_is_refused_by_a_stage_that_reads_it(key):
    """Changed under a stage that reads its section, the key stops the resume (one let through would continue a
    run with another seed, dataset or reference, silently)."""
    from rlhf_jax.config import STAGE_SECTIONS
    from rlhf_jax.training.resume import config_changes

    section = key.partition(".")[0] if "." in key else None
    stage = next(s for s, sections in STAGE_SECTIONS.items() if section is None or section in sections)
    old, new = ({"stage": stage, **_nested(key, v)} for v in ("p/a", "p/b"))
    if section == "lora" and key != "lora.rank":  # read where adapters are trained
        old["lora"]["rank"] = new["lora"]["rank"] = 8
    if key == "stage":
        old, new = {"stage": "sft"}, {"stage": "rm"}
    assert config_changes(old, new)[0] == [f"{key}={_value_at(old, key)!r} (now {_value_at(new, key)!r})"]


def test_a_long_list_of_changed_shapes_is_cut_after_three():
    from rlhf_jax.training.resume import shape_changes

    old = ({f"w{i}": (2,) for i in range(5)}, [])
    for changed, expected in ((3, 3), (5, 4)):
        new = ({f"w{i}": (3,) if i < changed else (2,) for i in range(5)}, [])
        diffs = shape_changes(old, new)
        assert len(diffs) == expected and diffs[:3] == [f"parameter w{i} (2,) (now (3,))" for i in range(3)]
    assert diffs[3] == "and 2 more parameters"


def test_config_changes_classify_keys():
    from rlhf_jax.models.checkpoint import state_shapes
    from rlhf_jax.training.resume import config_changes, shape_changes

    old = {"seed": 0, "model": {"path": "a/b"}, "train": {"steps": 10, "batch_size": 8},
           "optim": {"lr": 1.0, "grad_clip": 1.0}}
    new = {"seed": 0, "model": {"path": "a/./b"}, "train": {"steps": 20, "batch_size": 16},
           "optim": {"lr": 2.0, "grad_clip": 0.5}}
    refused, allowed = config_changes(old, new)
    assert refused == ["train.batch_size=8 (now 16)"]
    assert allowed == ["optim.grad_clip=1.0 (now 0.5)", "optim.lr=1.0 (now 2.0)", "train.steps=10 (now 20)"]
    # booleans and nulls as a config writes them
    assert config_changes({"data": {"chat_template": True}}, {"data": {"chat_template": False}})[0] == [
        "data.chat_template=true (now false)"]
    assert config_changes({"ppo": {"no_eos_penalty": None}}, {"ppo": {"no_eos_penalty": -1.0}})[1] == [
        "ppo.no_eos_penalty=null (now -1.0)"]
    refused, _ = config_changes(old, {**new, "optim": {"lr": 1.0, "grad_clip": 0.0}})
    assert "optim.grad_clip=1.0 (now 0.0)" in refused
    # a key added to the schema since the checkpoint was saved: at its default no change, else one
    defaults = {"distributed": {"initialization_timeout": 300}}
    assert config_changes(old, {**old, **defaults}, defaults=defaults) == ([], [])
    assert config_changes(old, {**old, "distributed": {"initialization_timeout": 60}}, defaults=defaults) == (
        [], ["distributed.initialization_timeout=null (now 60)"])
    # the adapters' scale: the saved adapters would be another model
    sft = lambda kl: {"stage": "sft", "ppo": {"kl_coef": kl}, "optim": {"lr": 1.0}}  # a section sft never reads
    assert config_changes(sft(0.02), sft(0.5)) == ([], [])
    lora = lambda rank, alpha: {"lora": {"rank": rank, "alpha": alpha}}
    assert config_changes(lora(8, 16.0), lora(8, 32.0))[0] == ["lora.alpha=16.0 (now 32.0)"]
    assert config_changes(lora(0, 16.0), lora(8, 32.0))[0] == ["lora.rank=0 (now 8)"]  # alpha was never read
    assert config_changes(lora(0, 16.0), lora(0, 32.0)) == ([], [])
    # PPO-ptx and the EMA switched on or off change what the checkpoint holds; another coefficient steers
    ppo = lambda **kw: {"stage": "ppo", "ppo": {"ptx_coef": 0.0, "ema_decay": 0.0, **kw}}
    assert config_changes(ppo(), ppo(ptx_coef=0.1))[0] == ["ppo.ptx_coef=0.0 (now 0.1)"]
    assert config_changes(ppo(ptx_coef=0.1), ppo(ptx_coef=0.2)) == ([], ["ppo.ptx_coef=0.1 (now 0.2)"])
    assert config_changes(ppo(ema_decay=0.99), ppo())[0] == ["ppo.ema_decay=0.99 (now 0.0)"]
    assert config_changes(ppo(ptx_batch_size=4), ppo(ptx_batch_size=8))[0] == ["ppo.ptx_batch_size=4 (now 8)"]
    # keys of sections the stage never reads are not its business
    grpo = lambda reference: {"stage": "grpo", "ppo": {"reference": reference}, "rloo": {"reference": reference}}
    assert config_changes(grpo("a"), grpo("b")) == (["rloo.reference='a' (now 'b')"], [])  # nor listed as allowed
    # another KL / DPO reference is another objective; the same one spelled differently is not
    for stage in ("ppo", "dpo", "grpo", "rloo"):
        refused, _ = config_changes({stage: {"reference": "r/a"}}, {stage: {"reference": "r/b"}})
        assert refused == [f"{stage}.reference='r/a' (now 'r/b')"]
        assert config_changes({stage: {"reference": "r/a"}}, {stage: {"reference": "r/./a"}}) == ([], [])
    # a pipeline's dataset moved with its run: the same place relative to the run; elsewhere, another dataset
    before = {"run_dir": "p/sft", "data": {"dir": "p/data"}}
    moved = config_changes(before, {"run_dir": "q/sft", "data": {"dir": "q/data"}})
    assert moved == ([], [])  # nothing the user changed: no warning
    # the start model moved with the run too: unnamed when its files are the same, refused when they are not
    started = {**before, "model": {"path": "p/pretrain/export"}}
    after = {"run_dir": "q/sft", "data": {"dir": "q/data"}, "model": {"path": "q/pretrain/export"}}
    assert config_changes(started, after, same_models={"model.path"}) == ([], [])
    assert config_changes(started, after)[0] == ["model.path='p/pretrain/export' (now 'q/pretrain/export')"]
    refused, _ = config_changes(before, {"run_dir": "q/sft", "data": {"dir": "p2"}})
    assert refused == ["data.dir='p/data' (now 'p2')"]
    assert shape_changes(({"w": (2, 3)}, [(2, 3)]), ({"w": (2, 4)}, [(2, 4)])) == ["parameter w (2, 3) (now (2, 4))"]
    # PPO's state holds two models: their params are told apart by model, and are params, not optimizer state
    ppo_state = {"policy": {"params": {"w": np.zeros((2, 3))}, "opt": [np.zeros((2, 3))]},
                 "value": {"params": {"w": np.zeros((2, 5))}}}
    assert state_shapes(ppo_state) == ({"policy/w": (2, 3), "value/w": (2, 5)}, [(2, 3)])
    assert shape_changes(({"value/layers/w": (2, 4)}, []), ({"value/layer_0/w": (4,)}, [])) == [
        "the checkpoint's layers are scanned (set model.scan_layers=true to resume it)"]
    assert shape_changes(({"w": (2, 3)}, [()]), ({"w": (2, 3)}, [(), ()])) == ["optimizer state (1 arrays, now 2)"]
    per_layer = {"layer_0/mlp/wo": (4, 2), "layer_1/mlp/wo": (4, 2)}, []
    scanned = {"layers/mlp/wo": (2, 4, 2)}, []
    assert shape_changes(per_layer, scanned) == [
        "the checkpoint's layers are one subtree per layer (set model.scan_layers=false to resume it)"]
    assert shape_changes(scanned, per_layer) == [
        "the checkpoint's layers are scanned (set model.scan_layers=true to resume it)"]


# ------------------------------------------------------------------------------------------------ OS errors


def test_a_failing_save_is_one_line_and_keeps_the_last_checkpoint(tiny, data_dir, workdir, monkeypatch):
    """The disk fills up at step 3's checkpoint: one line with the directory, the OS reason and the last
    complete step; steps 1 and 2 stay, and nothing is exported."""
    run_dir = workdir / "disk_full"
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=5")
    assert rc == 2 and "Traceback" not in err
    line = _last_line(err)
    assert line.startswith(f"error: {(run_dir / 'checkpoints').resolve()}: saving step 3 failed (")
    assert "No space left on device" in line and "step 2 is the last complete checkpoint" in line
    assert _steps(run_dir) == [1, 2]
    assert not (run_dir / "export").exists()


def test_run_dir_that_is_a_file(tiny, data_dir, workdir):
    path = workdir / "a_file"
    path.write_text("x")
    rc, _, err = _train(tiny, data_dir, path, "train.steps=1")
    assert rc == 2 and err.strip() == f"error: run_dir={path}: is a file, expected a directory"
    assert path.read_text() == "x"


def test_a_checkpoints_path_that_is_a_file_is_refused_before_training(tiny, data_dir, workdir):
    run_dir = workdir / "checkpoints_file"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("x")
    rc, out, err = _train(tiny, data_dir, run_dir, "train.steps=2")
    assert rc == 2 and err.strip().splitlines()[-1] == (f"error: {run_dir.resolve()}/checkpoints: is a file, expected "
                                                        "the run's checkpoint directory; move it away")
    assert "step" not in out and not (run_dir / "metrics.jsonl").exists()


def test_a_config_error_found_in_a_new_run_dir_leaves_nothing(tiny, data_dir, workdir):
    run_dir = workdir / "never_made" / "sft"
    rc, _, err = _train(tiny, data_dir, run_dir, "train.steps=1", "data.max_prompt_tokens=1000")
    assert rc == 2 and "exceeds the model's 512 positions" in _last_line(err)
    assert not run_dir.parent.exists()  # nor the parent made for it


def test_sequences_past_a_rotary_model_positions_are_refused(tiny, data_dir, workdir):
    rc, _, err = _train(tiny, data_dir, workdir / "too_long", "train.steps=1", "data.max_prompt_tokens=500",
                        "data.max_response_tokens=13")
    assert rc == 2
    assert _last_line(err) == ("error: data.max_prompt_tokens + data.max_response_tokens = 513 exceeds the "
                               f"model's 512 positions (model.path={tiny})")
