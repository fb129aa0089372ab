"""Evaluation through the real CLI on the shortened demo run (conftest.demo_run): a policy against itself ties
exactly (win rate 0.5, KL 0); every saved step of a PPO run is evaluated and plotted while an interrupted save is
skipped; wrong-kind models and inputs fail in one line before anything is sampled."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf_jax import evaluate
from rlhf_jax.data.pipeline import open_split

from cli_helpers import run_quietly

GOLD = "rlhf_jax.tasks.sentiment:gold"


@pytest.fixture(scope="module")
def inputs(demo_run, tmp_path_factory):
    run = demo_run["dir"]
    root = tmp_path_factory.mktemp("eval")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("".join(f"Review #{n} of the {thing}:\n" for n in (1, 2) for thing in ("lamp", "bike")))
    (root / "rm_run" / "checkpoints").mkdir(parents=True)  # what an rm run looks like to the evaluator
    (root / "rm_run" / "config.json").write_text(json.dumps({"stage": "rm"}))
    return {"root": root, "sft": run / "sft" / "export", "rm": run / "rm" / "export", "ppo": run / "ppo",
            "data": run / "data", "prompt_file": prompt_file}


def _eval(inputs, out, *args):
    argv = ["--reference", inputs["sft"], "--reward-model", inputs["rm"], "--out", out, "--max-new-tokens", "12",
            "--batch-size", "8", "--max-prompt-tokens", "16", *args]
    return run_quietly(evaluate.main, argv)


def test_a_policy_against_itself_ties_exactly(inputs):
    out = inputs["root"] / "self"
    rc, _, err = _eval(inputs, out, "--policy", inputs["sft"], "--prompts", inputs["prompt_file"], "--gold", GOLD,
                       "--rankings", f"{inputs['data'] / 'rankings'}:eval")
    assert rc == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    (policy,) = report["policies"]
    assert policy["win_rate"] == 0.5 and policy["win_rate_ci"] == [0.5, 0.5]
    assert policy["gold_win_rate"] == 0.5 and policy["kl"] == 0.0 and policy["kl_k3"] == 0.0
    assert policy["score_mean"] == report["reference"]["score_mean"] and report["prompts"] == 4
    assert 0.5 < report["rm_accuracy"] < 1.0 and policy["rm_accuracy"] == report["rm_accuracy"]
    assert 0.7 < report["labeler_ceiling"] < 0.9  # recorded by the label stage with the rankings
    md = (out / "report.md").read_text()
    assert "Review #1 of the lamp:" in md and "RLHF made no clear difference" in md


def test_all_steps_evaluates_every_saved_step_and_skips_an_interrupted_save(inputs, monkeypatch):
    run = inputs["ppo"]
    partial = run / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000"
    partial.mkdir()
    (partial / "garbage").write_text("not a checkpoint")
    monkeypatch.chdir(run.parent)  # the run named by a relative path, as users type it
    try:
        out = inputs["root"] / "steps"
        rc, _, err = _eval(inputs, out, "--policy", run.name, "--all-steps", "--prompts", f"{inputs['data'] / 'prompts'}",
                           "--gold", GOLD, "--runs", run)
    finally:
        shutil.rmtree(partial)
    assert rc == 0, err[-2000:]
    assert "30.orbax-checkpoint-tmp-1700000000: an unfinished (interrupted) checkpoint save; skipped" in err
    report = json.loads((out / "report.json").read_text())
    assert [p["step"] for p in report["policies"]] == [8, 16, 24]
    assert report["prompts"] == len(open_split(inputs["data"], "prompts", "eval")[0])  # the held-out split
    assert all(p["kl"] > 0 for p in report["policies"]), [p["kl"] for p in report["policies"]]
    for png in ("score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize("flags, fragment", [
    (["--policy", "{rm}"], "a reward/value model (scalar head), expected a policy"),
    (["--policy", "{sft}", "--reward-model", "{sft}"], "a language model, expected a reward model"),
    (["--policy", "{root}/missing"], "does not exist"),
    (["--policy", "{ppo}", "--step", "7"], "no complete checkpoint of step 7"),
    (["--policy", "{root}/rm_run"], "a training run of a reward model, not a policy"),
    (["--policy", "{sft}", "--prompts", "{data}/rankings"], "a 'rankings' dataset, expected one of kind 'prompts'"),
    (["--policy", "{sft}", "--gold", "rlhf_jax.tasks.sentiment:nothing"], "has no function 'nothing'"),
])
def test_wrong_inputs_fail_in_one_line(inputs, flags, fragment):
    flags = [f.format(**inputs) for f in flags]
    if "--prompts" not in flags:
        flags += ["--prompts", str(inputs["prompt_file"])]
    rc, _, err = _eval(inputs, inputs["root"] / "bad", *flags)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err and "eval:" not in err  # refused before the first sample
