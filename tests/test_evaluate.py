"""Evaluation through the real CLI on tiny models: a policy against itself ties exactly (win rate 0.5, KL 0) and
is deterministic; every saved step of a PPO run is evaluated and plotted while an interrupted save is skipped;
wrong-kind models fail in one line."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import evaluate, loop
from rlhf_jax.data.pipeline import open_split
from rlhf_jax import main as main_cli

from cli_helpers import run_quietly

WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny policy, a reward model made from it, prompts (a file and a dataset with an eval split), rankings,
    and a PPO run of 3 iterations with a checkpoint at each."""
    from rlhf_jax.checkpoint import load_model, save_model
    from rlhf_jax.data import __main__ as data_cli
    from rlhf_jax.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    tiny = build_tiny_model(root / "tiny", seed=0)
    loaded = load_model(tiny)
    params = loop.with_head(loaded.params, loaded.cfg, "lm", "scalar", jax.random.key(1))
    rm = save_model(root / "rm", jax.tree.map(np.asarray, params), loaded.cfg, "scalar", tiny,
                    extra={"reward_norm": {"gain": 2.0, "bias": 0.5}})
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("".join(f"Tell me about the {a} {b}\n" for a in WORDS for b in WORDS[:2]))
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the {a} {b}"}) + "\n" for a in WORDS for b in WORDS))
    data = root / "data"
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(src), "--data-dir", str(data), "--name", "asks",
                          "--eval-fraction", "0.25"]) == 0
    ranks = root / "ranks.jsonl"
    ranks.write_text("".join(json.dumps({"prompt": f"Pick a {a}", "responses": [f" the {a}", f" a {b}", " no"],
                                         "ranks": [0, 1, 2]}) + "\n" for a in WORDS for b in WORDS[:3]))
    assert data_cli.main(["--format", "jsonl_rankings", "--input", str(ranks), "--data-dir", str(data),
                          "--name", "ranks", "--eval-fraction", "0.5"]) == 0
    (root / "rm_run" / "checkpoints").mkdir(parents=True)  # what an rm run looks like to the evaluator
    (root / "rm_run" / "config.json").write_text(json.dumps({"stage": "rm"}))
    run = root / "ppo"
    rc, _, err = run_quietly(main_cli.main, [
        "stage=ppo", f"run_dir={run}", f"model.path={tiny}", f"ppo.reward_model={rm}", f"data.dir={data}",
        "data.name=asks", "data.max_prompt_tokens=12", "sampling.max_new_tokens=8", "train.batch_size=8",
        "train.steps=3", "train.save_every=1", "train.keep_checkpoints=3", "optim.lr=1e-3"])
    assert rc == 0, err[-2000:]
    return {"root": root, "tiny": tiny, "rm": rm, "prompt_file": prompt_file, "data": data, "run": run}


def _eval(inputs, out, *args):
    argv = ["--reference", inputs["tiny"], "--reward-model", inputs["rm"], "--out", out, "--max-new-tokens", "6",
            "--batch-size", "8", "--max-prompt-tokens", "12", *args]
    return run_quietly(evaluate.main, argv)


def test_a_policy_against_itself_ties_exactly_and_is_deterministic(inputs):
    reports = []
    for name in ("self_a", "self_b"):
        out = inputs["root"] / name
        rc, _, err = _eval(inputs, out, "--policy", inputs["tiny"], "--prompts", inputs["prompt_file"],
                           "--gold", "gold_scorers:length", "--rankings", f"{inputs['data'] / 'ranks'}:eval")
        assert rc == 0, err[-2000:]
        reports.append(json.loads((out / "report.json").read_text()))
    report = reports[0]
    (policy,) = report["policies"]
    assert policy["win_rate"] == 0.5 and policy["win_rate_ci"] == [0.5, 0.5]
    assert policy["gold_win_rate"] == 0.5 and policy["kl"] == 0.0 and policy["kl_k3"] == 0.0
    assert policy["score_mean"] == report["reference"]["score_mean"] and report["prompts"] == 16
    assert 0.0 <= report["rm_accuracy"] <= 1.0 and policy["rm_accuracy"] == report["rm_accuracy"]
    assert reports[0] == reports[1]  # same seed, same report
    md = (inputs["root"] / "self_a" / "report.md").read_text()
    assert "Tell me about the red cat" in md


def test_all_steps_evaluates_every_saved_step_and_skips_an_interrupted_save(inputs):
    run = inputs["run"]
    partial = run / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    partial.mkdir()
    (partial / "garbage").write_text("not a checkpoint")
    try:
        out = inputs["root"] / "steps"
        rc, _, err = _eval(inputs, out, "--policy", run, "--all-steps", "--prompts", f"{inputs['data'] / 'asks'}",
                           "--gold", "gold_scorers:length", "--runs", run)
    finally:
        shutil.rmtree(partial)
    assert rc == 0, err[-2000:]
    assert "4.orbax-checkpoint-tmp-1700000000: an unfinished (interrupted) checkpoint save; skipped" in err
    report = json.loads((out / "report.json").read_text())
    assert [p["step"] for p in report["policies"]] == [1, 2, 3]
    assert report["prompts"] == len(open_split(inputs["data"], "asks", "eval")[0])  # the held-out split
    assert all(p["kl"] > 0 for p in report["policies"][1:]), [p["kl"] for p in report["policies"]]
    for png in ("score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize("flags, fragment", [
    (["--policy", "{rm}"], "a reward/value model (scalar head), expected a policy"),
    (["--policy", "{tiny}", "--reward-model", "{tiny}"], "a language model, expected a reward model"),
    (["--policy", "{root}/missing"], "does not exist"),
    (["--policy", "{run}", "--step", "7"], "no complete checkpoint of step 7"),
    (["--policy", "{root}/rm_run"], "a training run of a reward model, not a policy"),
    (["--policy", "{tiny}", "--prompts", "{data}/ranks"], "a 'rankings' dataset, expected one of kind 'prompts'"),
    (["--policy", "{tiny}", "--gold", "gold_scorers:nothing"], "has no function 'nothing'"),
])
def test_wrong_inputs_fail_in_one_line(inputs, flags, fragment):
    flags = [f.format(**inputs) for f in flags]
    if "--prompts" not in flags:
        flags += ["--prompts", str(inputs["prompt_file"])]
    rc, _, err = _eval(inputs, inputs["root"] / "bad", *flags)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err
