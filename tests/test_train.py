"""The sft and rm training stages end to end: the real CLI (in-process and as a subprocess), the trainer on
several meshes, gradient accumulation, resume after SIGKILL, and bad training configs.

One tiny model and two prepared datasets are shared by the module:
  rep   sft: "Repeat: red cat sun" -> " red cat sun" (2..4 of 10 words), 200 rows, 10% held out
  good  rankings: K = 2..5 responses with 0..5 copies of "good" plus 2 random words; more "good" ranks
        better (distinct counts per prompt, so every prompt has exactly one rank-0 response), 300 rows, 20% held out
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.config import load_config
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.tiny import build_tiny_model

from cli_helpers import run_quietly as _quiet
from compile_helpers import subprocess_env


REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish", "bird", "star"]
SUBPROCESS_TIMEOUT = 180


# ------------------------------------------------------------------------------------------------ helpers


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    """Training loss per logged step (the last line wins, so a resumed run's relogged steps replace)."""
    return {m["step"]: m["loss"] for m in _metrics(run_dir) if "loss" in m}


def _evals(run_dir: Path) -> list[dict]:
    return [m for m in _metrics(run_dir) if any(k.startswith("eval_") for k in m)]


def _assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x in jax.tree_util.tree_leaves_with_path(a):
        y = b
        for key in path:
            y = y[key.key]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def tiny(workdir) -> Path:
    return build_tiny_model(workdir / "tiny", seed=0)


def _sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        rows.append({"prompt": f"Repeat: {words}", "response": f" {words}"})
    return rows


def _ranking_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        counts = rng.sample(range(6), rng.randint(2, 5))  # distinct "good" counts: no ties
        responses = []
        for c in counts:
            tokens = ["good"] * c + rng.sample(WORDS, 2)
            rng.shuffle(tokens)
            responses.append(" " + " ".join(tokens))
        order = sorted(counts, reverse=True)
        rows.append({"prompt": f"Review {i}: {' '.join(rng.sample(WORDS, 2))}", "responses": responses,
                     "ranks": [order.index(c) for c in counts]})
    return rows


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    """Both datasets, prepared through the data CLI."""
    rng = random.Random(0)
    root = workdir / "data"
    for fmt, name, rows, frac in (("jsonl_sft", "rep", _sft_rows(rng, 200), 0.1),
                                  ("jsonl_rankings", "good", _ranking_rows(rng, 300), 0.2)):
        src = workdir / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc, out, err = _quiet(data_cli.main, ["--format", fmt, "--input", src, "--data-dir", root, "--name", name,
                                              "--eval-fraction", frac])
        assert rc == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["examples"]["eval"] > 0 and summary["examples"]["train"] > 0, summary
    return root


def _sft_args(tiny: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["stage=sft", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=rep",
            "data.max_prompt_tokens=24", "data.max_response_tokens=16", "train.batch_size=16", *extra]


def _rm_args(tiny: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["stage=rm", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=good",
            "data.max_prompt_tokens=16", "data.max_response_tokens=16", "train.batch_size=16", *extra]


@pytest.fixture(scope="module")
def sft_run(tiny, data_dir, workdir) -> dict:
    run_dir = workdir / "sft"
    argv = _sft_args(tiny, data_dir, run_dir, "train.steps=40", "optim.lr=3e-3", "optim.warmup_steps=5",
                     "train.eval_every=20", "train.save_every=20", "train.log_every=5")
    rc, out, err = _quiet(main_cli.main, argv)
    return {"rc": rc, "out": out, "err": err, "dir": run_dir}


@pytest.fixture(scope="module")
def rm_run(tiny, data_dir, workdir) -> dict:
    run_dir = workdir / "rm"
    argv = _rm_args(tiny, data_dir, run_dir, "train.steps=40", "optim.lr=3e-3", "optim.warmup_steps=5",
                    "train.eval_every=20", "train.save_every=0", "train.log_every=5", "rm.normalize=bias_gain")
    rc, out, err = _quiet(main_cli.main, argv)
    return {"rc": rc, "out": out, "err": err, "dir": run_dir, "argv": argv}


# ------------------------------------------------------------------------------------------------ sft


def test_sft_cli_learns_and_exports(sft_run, tiny):
    assert sft_run["rc"] == 0, sft_run["err"]
    run_dir = sft_run["dir"]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(5, 41, 5))
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.7 * first, losses
    assert all(m["stage"] == "sft" and isinstance(m["time"], float) for m in _metrics(run_dir))

    evals = _evals(run_dir)
    assert [m["step"] for m in evals] == [20, 40]
    assert all(np.isfinite(m["eval_loss"]) and m["eval_target_tokens"] > 0 for m in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(sft_run["out"].strip().splitlines()[-1]) == summary
    assert summary["stage"] == "sft" and summary["steps"] == 40
    assert summary["loss"] == pytest.approx(losses[40], abs=1e-5)
    assert "eval_loss" in summary
    assert Path(summary["export"]) == (run_dir / "export").resolve()

    base = load_model(tiny)
    for name in ("export", "best"):
        loaded = load_model(run_dir / name)
        assert loaded.head == "lm", name
        assert loaded.tokenizer_dir is not None and loaded.tokenizer_dir.is_dir()
        assert loaded.cfg == base.cfg
        assert jax.tree.structure(loaded.params) == jax.tree.structure(base.params)
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "40").is_dir()
    assert (run_dir / "config.json").exists()
    saved_config = json.loads((run_dir / "checkpoints" / "40" / "config" / "metadata").read_text())
    assert saved_config["stage"] == "sft" and saved_config["train"]["steps"] == 40  # the resolved config
    train_lines = [m for m in _metrics(run_dir) if "loss" in m]
    assert all(m["truncated_examples"] == 0 for m in train_lines)  # every example fits 24 + 16 tokens


def test_truncated_examples_are_counted(tiny, data_dir, workdir):
    """Prompts cut to 3 tokens: every example of every step is truncated, and the running count says so."""
    args = [*_mesh_args("sft", tiny, data_dir), "data.max_prompt_tokens=3"]
    _train_on_mesh(args, workdir / "truncating", (8, 1, 1))
    counts = {m["step"]: m["truncated_examples"] for m in _metrics(workdir / "truncating") if "loss" in m}
    assert counts == {step: step * 16 for step in range(1, MESH_STEPS + 1)}


def test_loss_on_prompt_trains_on_prompt_tokens(tiny, data_dir, workdir):
    """The first batch's target tokens: with loss_on_prompt every real token that follows a real token (the
    first prompt token has no context), without it only response tokens."""
    from rlhf_jax.data.pipeline import train_dataset
    from rlhf_jax.models.tokenizer import load_tokenizer

    args = _mesh_args("sft", tiny, data_dir)
    batch = next(iter(train_dataset(load_config(None, args).data, "train", load_tokenizer(tiny), 16, seed=0)))
    targets = {}
    for on_prompt in (False, True):
        run_dir = workdir / f"loss_on_prompt_{on_prompt}"
        _train_on_mesh([*args, f"train.loss_on_prompt={str(on_prompt).lower()}"], run_dir, (8, 1, 1))
        targets[on_prompt] = next(m["target_tokens"] for m in _metrics(run_dir) if m["step"] == 1)
    assert targets[False] == batch["response_mask"][:, 1:].sum()
    assert targets[True] == (batch["mask"][:, 1:] & batch["mask"][:, :-1]).sum() > targets[False]
    # the held-out loss (and best/) is over the same targets as training's
    from rlhf_jax.models.transformer import init_params, make_model
    from rlhf_jax.stages.train import Stage

    model = make_model(load_model(tiny).cfg)
    params = init_params(model, jax.random.key(0))
    eval_batch = {**batch, "valid": np.ones(len(batch["ids"]), bool)}
    for on_prompt in (False, True):
        stage = Stage(load_config(None, [*args, f"train.loss_on_prompt={str(on_prompt).lower()}"]), model, None, None)
        assert stage.eval_sums(params, eval_batch)["target_tokens"] == targets[on_prompt]


# ------------------------------------------------------------------------------------------------ rm


def test_rm_cli_accuracy_and_export(rm_run):
    assert rm_run["rc"] == 0, rm_run["err"]
    run_dir = rm_run["dir"]
    final_eval = _evals(run_dir)[-1]
    assert final_eval["step"] == 40
    assert final_eval["eval_accuracy"] >= 0.9, final_eval
    assert final_eval["eval_prompts"] > 0 and final_eval["eval_pairs"] >= final_eval["eval_prompts"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(rm_run["out"].strip().splitlines()[-1]) == summary
    assert summary["stage"] == "rm" and summary["eval_accuracy"] >= 0.9

    loaded = load_model(run_dir / "export")
    assert loaded.head == "scalar"
    assert "lm_head" not in loaded.params and "score" in loaded.params
    meta = json.loads((run_dir / "export" / "model.json").read_text())
    norm = meta["reward_norm"]
    assert loaded.extra["reward_norm"] == norm
    assert isinstance(norm["gain"], float) and isinstance(norm["bias"], float) and norm["gain"] > 0
    assert summary["reward_norm"] == norm
    # best/ scores in normalised units too (PPO and eval read it from either; without it they used raw scores)
    best = load_model(run_dir / "best")
    best_step = min(_evals(run_dir), key=lambda m: m["eval_loss"])["step"]
    assert set(best.extra["reward_norm"]) == set(norm) and best.extra["reward_norm"]["gain"] > 0
    assert (best.extra["reward_norm"] == norm) == (best_step == 40), (best_step, best.extra, norm)


def test_a_non_finite_eval_loss_is_never_the_best(tiny, data_dir, workdir, monkeypatch):
    """An evaluation whose loss is NaN (the params finite: an overflow in the eval pass alone) exports nothing to
    best/; stored as the best, no later loss would compare below it and best/ would stay the NaN step's model."""
    from rlhf_jax.runtime import sharding
    from rlhf_jax.stages import train as train_stage

    evaluated = []

    def first_nan(*args, **kwargs):
        sums = train_eval_sums(*args, **kwargs)
        evaluated.append(sums)
        return {k: float("nan") for k in sums} if len(evaluated) == 1 else sums

    train_eval_sums = train_stage.eval_sums
    monkeypatch.setattr(train_stage, "eval_sums", first_nan)
    run_dir = workdir / "nan_eval"
    cfg = load_config(None, _sft_args(tiny, data_dir, run_dir, "train.steps=3", "train.eval_every=1",
                                      "train.save_every=0", "optim.lr=3e-3"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_stage.train(cfg, run_dir, mesh=sharding.make_mesh((8, 1, 1), ("data", "fsdp", "tensor")))
    losses = {m["step"]: m["eval_loss"] for m in _evals(run_dir)}
    assert len(evaluated) == 3 and losses[1] is None and losses[3] < losses[2], losses  # NaN is logged as null
    _assert_trees_equal(load_model(run_dir / "best").params, load_model(run_dir / "export").params)


def test_rm_bias_gain_normalises_reference_rewards(rm_run):
    """Recompute the rewards of the eval split's best responses from the export: gain * r + bias has mean 0
    and std 1; the export alone also ranks the held-out responses correctly."""
    import jax.numpy as jnp

    from rlhf_jax.data.pipeline import eval_batches
    from rlhf_jax.models.tokenizer import load_tokenizer
    from rlhf_jax.models.transformer import make_model
    from rlhf_jax.stages.train import best_responses
    from rlhf_jax.training.steps import completion_rewards

    assert rm_run["rc"] == 0, rm_run["err"]
    cfg = load_config(None, rm_run["argv"])
    loaded = load_model(rm_run["dir"] / "export")
    model = make_model(loaded.cfg, "scalar")
    tokenizer = load_tokenizer(loaded.tokenizer_dir)
    params = jax.tree.map(jnp.asarray, loaded.params)
    fn = jax.jit(lambda p, b: completion_rewards(model, p, b))

    reference, correct, pairs = [], 0, 0
    for batch in eval_batches(cfg.data, cfg.data.eval_split, tokenizer, cfg.train.batch_size):
        valid = batch["valid"]
        model_batch = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
        rewards = np.asarray(fn(params, model_batch))
        reference.extend(rewards[best_responses(batch["pairs"]) & valid[:, None]].tolist())
        # counts[b, i, j]: how often response i was preferred to response j, real rows only
        counts = batch["pairs"] * valid[:, None, None]
        correct += int(np.sum(counts * (rewards[:, :, None] > rewards[:, None, :])))
        pairs += int(np.sum(counts))

    norm = loaded.extra["reward_norm"]
    assert norm["reference_responses"] == len(reference) > 2
    normalised = norm["gain"] * np.asarray(reference) + norm["bias"]
    np.testing.assert_allclose(np.mean(normalised), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.std(normalised), 1.0, atol=1e-2)
    assert pairs > 0 and correct / pairs >= 0.9, (correct, pairs)


def test_rm_epoch_reference_dataset_bias_and_micro_batched_eval(tiny, data_dir, workdir, monkeypatch):
    """One epoch of rm (train.epochs=1) with gradient accumulation and rm.normalize=bias against an sft dataset:
    the step count is one pass over the training prompts; every evaluation and reference forward uses the
    micro-batch (what is known to fit), never the whole batch; the gain stays 1 and the demonstrations'
    normalised rewards, recomputed from the export, have mean 0."""
    import dataclasses

    import jax.numpy as jnp

    from rlhf_jax.data.pipeline import eval_batches, open_split
    from rlhf_jax.models.tokenizer import load_tokenizer
    from rlhf_jax.models.transformer import forward, make_model
    from rlhf_jax.runtime import sharding
    from rlhf_jax.stages import train as trainers
    from rlhf_jax.training.losses import last_token_values

    sizes = []
    real_eval_batches = trainers.eval_batches

    def recording(spec, split, tokenizer, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return real_eval_batches(spec, split, tokenizer, batch_size, *args, **kwargs)

    monkeypatch.setattr(trainers, "eval_batches", recording)
    run_dir = workdir / "rm_reference"
    cfg = load_config(None, _rm_args(tiny, data_dir, run_dir, "train.epochs=1", "train.batch_size=64",
                                     "optim.grad_accum_steps=4", "train.eval_every=2", "train.save_every=0",
                                     "rm.normalize=bias", "rm.reference_dataset=rep"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        summary = trainers.train(cfg, run_dir, mesh=sharding.make_mesh((8, 1, 1), ("data", "fsdp", "tensor")))
    train_prompts = len(open_split(data_dir, "good", "train")[0])
    assert summary["steps"] == train_prompts // 64 >= 2
    assert "seen" not in err.getvalue()  # one epoch repeats nothing
    assert len(sizes) >= 3 and set(sizes) == {16}, sizes  # 2 evaluations and the reference rewards

    norm = summary["reward_norm"]
    assert norm["gain"] == 1.0 and norm["reference"] == "rep"
    loaded = load_model(run_dir / "export")
    model, params = make_model(loaded.cfg, "scalar"), jax.tree.map(jnp.asarray, loaded.params)
    score = jax.jit(lambda p, ids, mask: last_token_values(forward(model, p, ids, mask), mask))
    rewards = []
    for batch in eval_batches(dataclasses.replace(cfg.data, name="rep"), "eval", load_tokenizer(tiny), 16):
        rewards.extend(np.asarray(score(params, batch["ids"], batch["mask"]))[batch["valid"]].tolist())
    assert norm["reference_responses"] == len(rewards) > 2
    np.testing.assert_allclose(np.mean(np.asarray(rewards) + norm["bias"]), 0.0, atol=1e-4)
    assert abs(np.std(rewards) - 1.0) > 1e-3  # only shifted, not scaled


def test_rm_warns_when_it_would_repeat_comparisons(capsys):
    from rlhf_jax.stages.train import _warn_if_repeating

    cfg = load_config(None, ["stage=rm", "train.batch_size=16"])
    _warn_if_repeating(cfg, 10, 160)
    assert capsys.readouterr().err == ""
    _warn_if_repeating(cfg, 20, 160)
    err = capsys.readouterr().err
    assert err.startswith("warning: rm: 20 steps x 16 prompts = 320 > 160") and "2.00 times" in err
    assert "train.epochs=1" in err and len(err.strip().splitlines()) == 1
    _warn_if_repeating(load_config(None, ["stage=rm", "train.batch_size=16", "train.epochs=2"]), 20, 160)
    assert capsys.readouterr().err == ""  # asked for by name


# ------------------------------------------------------------------------------------------------ meshes


MESH_STEPS = 3


def _train_on_mesh(cfg_args: list[str], run_dir: Path, shape, devices=None) -> dict[int, float]:
    from rlhf_jax.runtime import sharding
    from rlhf_jax.stages.train import train

    cfg = load_config(None, [*cfg_args, f"run_dir={run_dir}"])
    mesh = sharding.make_mesh(shape, ("data", "fsdp", "tensor"), devices=devices)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(cfg, run_dir, mesh=mesh)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, MESH_STEPS + 1))
    return losses


def _mesh_args(stage: str, tiny: Path, data_dir: Path) -> list[str]:
    # No eval split (skips evaluation) and no reward normalisation: only the training steps matter here.
    common = [f"train.steps={MESH_STEPS}", "train.log_every=1", "train.save_every=0", "optim.lr=3e-3",
              "data.eval_split=no_such_split"]
    if stage == "sft":
        return _sft_args(tiny, data_dir, Path("unused"), *common)
    return _rm_args(tiny, data_dir, Path("unused"), *common, "rm.normalize=none")


@pytest.fixture(scope="module")
def one_device_losses(tiny, data_dir, workdir):
    """stage -> its losses on one device, trained when first asked for (the fast tier asks for rm's only)."""
    losses = {}

    def of(stage: str) -> dict:
        if stage not in losses:
            losses[stage] = _train_on_mesh(_mesh_args(stage, tiny, data_dir), workdir / f"mesh_{stage}_1dev",
                                           (1, 1, 1), devices=jax.devices()[:1])
        return losses[stage]
    return of


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_losses_independent_of_mesh(stage, shape, tiny, data_dir, workdir, one_device_losses):
    assert len(jax.devices()) == 8
    run_dir = workdir / f"mesh_{stage}_{'x'.join(map(str, shape))}"
    losses = _train_on_mesh(_mesh_args(stage, tiny, data_dir), run_dir, shape)
    reference = one_device_losses(stage)
    assert len(set(reference.values())) == MESH_STEPS, "the steps should see different losses"
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= 1e-5, (step, losses, reference)


def test_grad_accumulation_matches_one_batch(tiny, data_dir, workdir):
    args = _mesh_args("sft", tiny, data_dir)
    whole = _train_on_mesh(args, workdir / "accum_1", (8, 1, 1))
    accum = _train_on_mesh([*args, "optim.grad_accum_steps=2"], workdir / "accum_2", (8, 1, 1))
    for step, loss in whole.items():
        assert abs(accum[step] - loss) <= 1e-5, (step, accum, whole)
    # the gradients themselves, not only the loss: clipping and Adam would hide a scale on them
    norms = [{m["step"]: m["grad_norm"] for m in _metrics(workdir / run) if "grad_norm" in m}
             for run in ("accum_1", "accum_2")]
    assert norms[0].keys() == norms[1].keys() and len(norms[0]) == MESH_STEPS
    for step, norm in norms[0].items():
        assert norms[1][step] == pytest.approx(norm, rel=1e-4), (step, norms)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_with_another_seed_is_refused(tiny, data_dir, workdir):
    from rlhf_jax.errors import UserError
    from rlhf_jax.runtime import sharding
    from rlhf_jax.stages.train import train

    args = _mesh_args("sft", tiny, data_dir)
    run_dir = workdir / "seeded"
    _train_on_mesh(args, run_dir, (8, 1, 1))
    with pytest.raises(UserError, match=r"seed=0 \(now 1\)"):
        _train_on_mesh([*args, "seed=1", f"train.steps={MESH_STEPS + 2}"], run_dir, (8, 1, 1))
    # fewer steps than the checkpoint has: its exports would be of one step and its summary of another; refused
    # before the run's config.json is rewritten
    config, err = (run_dir / "config.json").read_text(), io.StringIO()
    with pytest.raises(UserError, match=f"its checkpoint is at step {MESH_STEPS}, past the {MESH_STEPS - 1} steps "
                                        r"this config trains \(train.steps\); raise train.steps"):
        with contextlib.redirect_stderr(err):
            train(load_config(None, [*args, f"train.steps={MESH_STEPS - 1}", f"run_dir={run_dir}"]), run_dir,
                  mesh=sharding.make_mesh((8, 1, 1), ("data", "fsdp", "tensor")))
    assert (run_dir / "config.json").read_text() == config
    assert "resuming with changed settings" not in err.getvalue()  # the refusal is the one line


RESUME_STEPS = 60


def _cli_command(tiny: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.main",
            *_sft_args(tiny, data_dir, run_dir, f"train.steps={RESUME_STEPS}", "train.save_every=10",
                       "train.keep_checkpoints=10",
                       "train.eval_every=0", "train.log_every=5", "optim.lr=3e-3", "optim.warmup_steps=5")]


@pytest.fixture(scope="module")
def straight_run(tiny, data_dir, workdir) -> Path:
    """The uninterrupted run that interrupted and killed runs of the same command are compared with."""
    run_dir = workdir / "straight"
    proc = subprocess.run(_cli_command(tiny, data_dir, run_dir), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" not in proc.stderr
    return run_dir


def _saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in _metrics(run_dir) if "loss" in m]


def _wait_for(path: Path, proc: subprocess.Popen, err_file: Path) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {err_file.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {path} in time"
        time.sleep(0.02)


def _assert_resumes_to_the_straight_run(tiny, data_dir, run_dir: Path, straight_run: Path) -> str:
    resumed = subprocess.run(_cli_command(tiny, data_dir, run_dir), cwd=REPO, env=subprocess_env(),
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resumed from .* at step (\d+)", resumed.stderr)
    assert match, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == RESUME_STEPS
    _assert_trees_equal(load_model(straight_run / "export").params, load_model(run_dir / "export").params)
    assert _losses(run_dir) == _losses(straight_run)
    assert _train_steps(run_dir) == _train_steps(straight_run)  # every step logged once, none twice
    # every other figure too: the learning rate's schedule resumes at its step, gradient norms, the final eval
    steady = lambda run: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_s")} for m in _metrics(run)]
    assert steady(run_dir) == steady(straight_run)
    # and the same checkpoints kept: a stop's own, off the save cadence, goes once a newer one is saved
    assert _saved_steps(run_dir) == _saved_steps(straight_run) == list(range(10, RESUME_STEPS + 1, 10))
    return match.group(1)


def test_resume_after_sigkill_is_bitwise_identical(tiny, data_dir, workdir, straight_run):
    """Kill -9 a run after its step-20 checkpoint, rerun the same command: the export is bitwise that of an
    uninterrupted run and so are the losses logged after resuming, each step once."""
    killed_dir, err_file = workdir / "killed", workdir / "killed.err"
    with open(workdir / "killed.out", "w") as out, open(err_file, "w") as err:  # files: a full pipe could block
        killed = subprocess.Popen(_cli_command(tiny, data_dir, killed_dir), cwd=REPO, env=subprocess_env(),
                                  stdout=out, stderr=err)
        try:
            # Wait for the finished (renamed) checkpoint of step 20; Orbax writes it under a tmp name first.
            _wait_for(killed_dir / "checkpoints" / "20", killed, err_file)
            killed.send_signal(signal.SIGKILL)
            killed.wait(timeout=30)
        finally:
            if killed.poll() is None:
                killed.kill()
                killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    # It died before finishing: no export or summary, and not every step logged.
    assert not (killed_dir / "export").exists() and not (killed_dir / "summary.json").exists()
    assert max(_losses(killed_dir), default=0) < RESUME_STEPS, \
        f"step {RESUME_STEPS} was logged before the kill: raise RESUME_STEPS"
    assert 20 <= int(_assert_resumes_to_the_straight_run(tiny, data_dir, killed_dir, straight_run)) < RESUME_STEPS


def test_signal_saves_the_step_in_hand_and_exits_4(tiny, data_dir, workdir, straight_run):
    """SIGTERM (preemption; SIGINT takes the same handler, see test_loop) after step 5: the run finishes its step,
    saves it, says so in one line and exits 4; the rerun resumes from exactly that step and ends bitwise where the
    straight run ends."""
    sig = signal.SIGTERM
    run_dir, err_file = workdir / f"signalled_{sig.name}", workdir / f"signalled_{sig.name}.err"
    with open(workdir / f"signalled_{sig.name}.out", "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(_cli_command(tiny, data_dir, run_dir), cwd=REPO, env=subprocess_env(),
                                stdout=out, stderr=err)
        try:
            _wait_for(run_dir / "metrics.jsonl", proc, err_file)
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            while max(_train_steps(run_dir), default=0) < 5:
                assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()[-2000:]
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert proc.returncode == 4, err_file.read_text()[-2000:]
    last = err_file.read_text().strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); saved; rerun the same command to resume", last)
    assert match, last
    step = int(match.group(1))
    assert 5 <= step < RESUME_STEPS and (run_dir / "checkpoints" / str(step)).is_dir()
    assert not (run_dir / "export").exists()
    assert int(_assert_resumes_to_the_straight_run(tiny, data_dir, run_dir, straight_run)) == step


# ------------------------------------------------------------------------------------------------ errors


def _assert_user_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name, fragment", [
    ("good", "rm.reference_dataset='good' is a 'rankings' dataset; the reference responses come from one of kind "
             "'sft'"),
    ("no_such", "rm.reference_dataset='no_such': "),
])
def test_rm_reference_dataset_is_checked_before_training(tiny, data_dir, workdir, name, fragment):
    """It is read only after training (by the reward normalisation): a wrong one failed at the end, its last steps
    unsaved, or with a traceback."""
    run_dir = workdir / f"rm_reference_{name}"
    rc, _, err = _quiet(main_cli.main, _rm_args(tiny, data_dir, run_dir, "train.steps=4", "rm.normalize=bias",
                                                f"rm.reference_dataset={name}"))
    _assert_user_error(rc, err, fragment)
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("overrides, fragments", [
    (["data.name="], ["data.name"]),
    (["train.batch_size=12"], ["batch_size", "12", "8"]),
    (["data.name=never_prepared"], ["no prepared dataset named 'never_prepared' in data.dir="]),
    (["data.name=good"], ["data.name='good' is a 'rankings' dataset", "stage 'sft' needs one of kind 'sft'"]),
    (["train.steps=0"], ["train.steps or train.epochs"]),
], ids=["no_data_name", "batch_not_divisible", "unprepared_dataset", "wrong_kind", "no_steps"])
def test_bad_training_config_fails_fast(overrides, fragments, tiny, data_dir, workdir):
    run_dir = workdir / f"bad_{len(list(workdir.glob('bad_*')))}"
    start = time.monotonic()
    rc, _, err = _quiet(main_cli.main, [*_sft_args(tiny, data_dir, run_dir, "train.steps=5"), *overrides])
    _assert_user_error(rc, err, *fragments)
    assert time.monotonic() - start < 60
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "export").exists()


def test_a_reward_norm_gain_that_magnifies_nearly_equal_reference_scores_is_warned(monkeypatch, capsys):
    """Reference responses the reward model scores alike (std 0.0024) gave a gain of 415 without a word."""
    from rlhf_jax.stages import train as train_stage

    cfg = load_config(None, ["stage=rm", "rm.normalize=bias_gain"])
    for rewards, warned in ((np.array([1.0, 1.005, 0.999, 1.002]), True), (np.array([0.5, -1.0, 2.0, 0.0]), False)):
        monkeypatch.setattr(train_stage, "reference_rewards", lambda *args: rewards)
        norm = train_stage.fit_reward_norm(cfg, types.SimpleNamespace(model=None), None, None, None, 4)["reward_norm"]
        err = capsys.readouterr().err
        assert norm["gain"] == pytest.approx(1 / np.std(rewards))
        assert (err == f"warning: the reward model scores the 4 reference responses nearly alike (std "
                       f"{np.std(rewards):.2g}): rm.normalize=bias_gain multiplies every reward by {norm['gain']:.3g}; "
                       "rm.normalize=bias keeps their scale\n") if warned else err == "", err
