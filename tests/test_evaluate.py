"""Evaluation through the real CLI on the shortened demo run (conftest.demo_run): win rates count the paired
samples the report shows, scored by the gold function itself; every saved step of a PPO run is evaluated and plotted while an interrupted save is
skipped; wrong-kind models and inputs fail in one line before anything is sampled."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import evaluate
from rlhf_jax.data.pipeline import open_split
from rlhf_jax.errors import UserError

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
    short = shutil.copytree(run / "sft" / "export", root / "shortpos")  # a policy of 16 positions
    meta = json.loads((short / "model.json").read_text())
    meta["config"]["max_position_embeddings"] = 16
    (short / "model.json").write_text(json.dumps(meta))
    return {"root": root, "sft": run / "sft" / "export", "rm": run / "rm" / "export", "ppo": run / "ppo",
            "data": run / "data", "prompt_file": prompt_file, "ppo_saves": demo_run["ppo_saves"]}


def _eval(inputs, out, *args):
    argv = ["--reference", inputs["sft"], "--reward-model", inputs["rm"], "--out", out, "--max-new-tokens", "12",
            "--batch-size", "8", "--max-prompt-tokens", "16", *args]
    return run_quietly(evaluate.main, argv)


def test_win_rates_are_those_of_the_paired_samples(inputs, monkeypatch):
    """The PPO policy against the SFT reference on 4 prompts: the gold scores in the report are the gold
    function's own on the texts shown side by side, and both win rates count those pairs (ties half)."""
    from rlhf_jax.eval import report as report_module
    from rlhf_jax.tasks.sentiment import gold

    shown = []
    write_report = report_module.write_report
    monkeypatch.setattr(report_module, "write_report", lambda out, result, samples, runs=(): (
        shown.extend(samples), write_report(out, result, samples, runs))[1])
    out = inputs["root"] / "pair"
    rc, _, err = _eval(inputs, out, "--policy", inputs["ppo"] / "export", "--prompts", inputs["prompt_file"],
                       "--gold", GOLD, "--rankings", f"{inputs['data'] / 'rankings'}:eval")
    assert rc == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    (policy,) = report["policies"]
    assert len(shown) == report["prompts"] == 4
    assert report["kl_of_sampled_distributions"] and "KL columns compare the unfiltered" not in err
    prompts = [row["prompt"] for row in shown]
    for side in ("policy", "reference"):
        expected = gold(prompts, [row[f"{side}_response"] for row in shown])
        assert [row[f"{side}_gold"] for row in shown] == pytest.approx(expected), side

    def wins(ours, theirs):
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)

    assert policy["gold_win_rate"] == pytest.approx(wins([r["policy_gold"] for r in shown],
                                                         [r["reference_gold"] for r in shown]))
    assert policy["win_rate"] == pytest.approx(wins([r["policy_score"] for r in shown],
                                                    [r["reference_score"] for r in shown]))
    assert policy["kl"] > 0  # the PPO policy has left the reference
    assert 0.5 < report["rm_accuracy"] < 1.0 and policy["rm_accuracy"] == report["rm_accuracy"]
    assert 0.7 < report["labeler_ceiling"] < 0.9  # recorded by the label stage with the rankings
    assert "Review #1 of the lamp:" in (out / "report.md").read_text()


def _eval_without_rm(inputs, out, *args):
    argv = ["--reference", inputs["sft"], "--out", out, "--max-new-tokens", "12", "--batch-size", "8",
            "--max-prompt-tokens", "16", "--prompts", inputs["prompt_file"], *args]
    return run_quietly(evaluate.main, argv)


def test_the_gold_scorer_alone_judges_without_a_reward_model(inputs, monkeypatch):
    """No --reward-model: the same paired samples, scored by the gold function only; no RM score or win rate
    anywhere (report.json, report.md, the headline), and the verdict judges by the gold win rate."""
    from rlhf_jax.eval import report as report_module
    from rlhf_jax.tasks.sentiment import gold

    shown = []
    write_report = report_module.write_report
    monkeypatch.setattr(report_module, "write_report", lambda out, result, samples, runs=(): (
        shown.extend(samples), write_report(out, result, samples, runs))[1])
    out = inputs["root"] / "gold_only"
    rc, _, err = _eval_without_rm(inputs, out, "--policy", inputs["ppo"] / "export", "--gold", GOLD)
    assert rc == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    (policy,) = report["policies"]
    assert report["reward_model"] is None and policy["win_rate"] is None and policy["score_mean"] is None
    assert all(row["policy_score"] is None and row["reference_score"] is None for row in shown)
    prompts = [row["prompt"] for row in shown]
    policy_gold, reference_gold = (gold(prompts, [row[f"{side}_response"] for row in shown])
                                   for side in ("policy", "reference"))
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_gold, reference_gold)) / len(shown)
    assert policy["gold_win_rate"] == pytest.approx(wins) and policy["kl"] > 0
    text = (out / "report.md").read_text()
    assert "RM score" not in text and "reward model" not in text and "by the gold reward" in text
    assert "export: gold win rate" in err and "by RM score" not in err


def gold_by_ending(prompts, responses, ended, metadata):
    assert metadata == [{"n": int(p.split("#")[1].split()[0])} for p in prompts], (prompts, metadata)
    return [float(e) for e in ended]


def test_a_gold_scorer_that_takes_ended_and_metadata_is_told_them(inputs):
    """Each prompt's metadata from the prepared prompts dataset; scoring 1 for an ended response and 0 for one cut
    at --max-new-tokens, its mean is the EOS rate."""
    from rlhf_jax.data import __main__ as data_cli

    rows = inputs["root"] / "with_metadata.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Review #{n} of the {thing}:\n", "metadata": {"n": n}}) + "\n"
                            for n in (1, 2) for thing in ("lamp", "bike")))  # the prompt file's
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(rows), "--data-dir", str(inputs["root"]),
                          "--name", "with_metadata"]) == 0
    out = inputs["root"] / "gold_ended"
    rc, _, err = _eval_without_rm(inputs, out, "--policy", inputs["ppo"] / "export", "--gold",
                                  f"{__name__}:gold_by_ending", "--max-new-tokens", "8",
                                  "--prompts", f"{inputs['root'] / 'with_metadata'}:train")
    assert rc == 0, err[-2000:]
    (policy,) = json.loads((out / "report.json").read_text())["policies"]
    assert 0 < policy["eos_rate"] < 1 and policy["gold_score_mean"] == pytest.approx(policy["eos_rate"])


@pytest.mark.full
def test_the_reference_against_itself_ties_exactly(inputs, monkeypatch):
    """Policy and reference sample each prompt with the same key: the reference evaluated as a policy draws the
    same responses, so every pair ties (win rates 0.5 with no interval) and the KL is 0. The reward model's
    scores are normalised by its export's reward_norm (gain, bias), as training normalised them."""
    from rlhf_jax.eval.evaluate import Programs
    from rlhf_jax.models.checkpoint import load_model

    norms, scores = set(), Programs.scores
    monkeypatch.setattr(Programs, "scores", lambda self, model, params, gain, bias, *rest: (
        norms.add((gain, bias)), scores(self, model, params, gain, bias, *rest))[1])
    out = inputs["root"] / "itself"
    rc, _, err = _eval(inputs, out, "--policy", inputs["sft"], "--prompts", inputs["prompt_file"], "--gold", GOLD)
    assert rc == 0, err[-2000:]
    norm = load_model(inputs["rm"]).extra["reward_norm"]
    assert norms == {(norm["gain"], norm["bias"])} and norm["bias"] != 0
    (policy,) = json.loads((out / "report.json").read_text())["policies"]
    assert policy["win_rate"] == policy["gold_win_rate"] == 0.5
    assert list(policy["win_rate_ci"]) == [0.5, 0.5] and policy["kl"] == pytest.approx(0.0, abs=1e-6)
    # a rerun into the same directory replaces the policy's line (a directory's, at step 0) instead of adding one
    assert _eval(inputs, out, "--policy", inputs["sft"], "--prompts", inputs["prompt_file"], "--gold", GOLD)[0] == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["step"]) for line in lines] == [("eval", 0)]


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
    assert [p["step"] for p in report["policies"]] == inputs["ppo_saves"] and len(inputs["ppo_saves"]) == 3
    assert report["prompts"] == len(open_split(inputs["data"], "prompts", "eval")[0])  # the held-out split
    assert all(p["kl"] > 0 for p in report["policies"]), [p["kl"] for p in report["policies"]]
    # the run's checkpoints as one curve over their steps, the policy named in every line
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    name = report["policies"][0]["name"].rsplit("@", 1)[0]
    assert [(line["policy"], line["step"]) for line in lines] == [(name, s) for s in inputs["ppo_saves"]]
    for png in ("score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_the_out_directory_of_a_training_run_is_refused(inputs):
    """Its metrics and TensorBoard curves are the run's: an evaluation's would hide them."""
    run = inputs["ppo"]
    before = (run / "metrics.jsonl").read_text()
    rc, _, err = _eval(inputs, run, "--policy", inputs["sft"], "--prompts", str(inputs["prompt_file"]))
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"error: --out {run}: holds a run of stage 'ppo'; give the eval stage a directory of its own"), err
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("flags, fragment", [
    (["--policy", "{rm}"], "error: --policy {rm}: a reward/value model (scalar head), expected a policy"),
    (["--policy", "{sft}", "--out", "{sft}/eval"], "error: --out {sft}/eval: is or is inside the model directory "
                                                   "--reference {sft}; "),
    (["--policy", "{sft}", "--reward-model", "{sft}"], "a language model, expected a reward model"),
    (["--policy", "{root}/missing"], "does not exist"),
    (["--policy", "{sft}", "--reference", "{root}/missing"], "error: --reference {root}/missing: does not exist"),
    (["--policy", "{sft}", "--reward-model", "{root}/missing"], "error: --reward-model {root}/missing: does not exist"),
    (["--policy", "{ppo}", "--step", "7"], "no complete checkpoint of step 7"),
    (["--policy", "{root}/rm_run"], "a training run of a reward model, not a policy"),
    (["--policy", "{sft}", "--prompts", "{data}/rankings"], "a 'rankings' dataset, expected one of kind 'prompts'"),
    (["--policy", "{sft}", "--gold", "rlhf_jax.tasks.sentiment:nothing"], "has no function 'nothing'"),
    (["--policy", "{sft}", "--prompts", "{root}/empty.txt"], "error: --prompts {root}/empty.txt: no prompts"),
    (["--policy", "{sft}", "--max-new-tokens", "5000"], " + --max-new-tokens (5000) = "),
    (["--policy", "{root}/shortpos"], "error: --policy {root}/shortpos: the longest prompt ("),  # only the reference's
    (["--policy", "{sft}", "--prompts", "{data}/prompts:nosuch"], "--prompts {data}/prompts:nosuch: "),
])
def test_wrong_inputs_fail_in_one_line(inputs, flags, fragment):
    flags = [f.format(**inputs) for f in flags]
    if "--prompts" not in flags:
        flags += ["--prompts", str(inputs["prompt_file"])]
    (inputs["root"] / "empty.txt").write_text("")
    rc, _, err = _eval(inputs, inputs["root"] / "bad", *flags)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment.format(**inputs) in lines[-1], err
    assert not (inputs["sft"] / "eval").exists()


@pytest.mark.parametrize("flags, fragment", [
    ([], "needs --reward-model or --gold"),
    (["--gold", GOLD, "--rankings", "{data}/rankings"], "--rankings measures the reward model's accuracy"),
])
def test_a_scorer_is_needed_and_rankings_need_the_reward_model(inputs, flags, fragment):
    rc, _, err = _eval_without_rm(inputs, inputs["root"] / "bad", "--policy", str(inputs["sft"]),
                                  *(f.format(**inputs) for f in flags))
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err and "eval:" not in err  # refused before the first sample


def test_a_bad_earlier_round_is_refused_before_the_first_sample(inputs):
    from rlhf_jax import main as main_cli

    bad = inputs["root"] / "round_bad"
    bad.mkdir(exist_ok=True)
    (bad / "report.json").write_text("{}")
    out = inputs["root"] / "rounds_out"
    rc, _, err = run_quietly(main_cli.main, [
        "stage=eval", f"eval.policies=[{inputs['sft']}]", f"eval.reference={inputs['sft']}",
        f"eval.reward_model={inputs['rm']}", f"eval.prompts={inputs['prompt_file']}", f"eval.rounds=[{bad}]",
        f"run_dir={out}", "sampling.max_new_tokens=4", "sampling.batch_size=8", "sampling.max_prompt_tokens=16"])
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"error: eval.rounds: {bad}/report.json has no evaluated policies (expected an eval report)"), err
    assert "eval:" not in err and not (out / "metrics.jsonl").exists()


def test_a_runs_relative_base_model_is_found_from_any_directory(tmp_path, monkeypatch):
    """A run started in `project/` with run_dir runs/x/ppo trains from model.path runs/x/sft/export: evaluating the
    run from inside runs/x, or after moving the project, reads that export, and a base model not there is one line
    naming the run's config.json."""
    from rlhf_jax.eval.policies import _base_model_path

    project = tmp_path / "project"
    run, export = project / "runs" / "x" / "ppo", project / "runs" / "x" / "sft" / "export"
    run.mkdir(parents=True)
    export.mkdir(parents=True)
    config = {"stage": "ppo", "run_dir": "runs/x/ppo", "model": {"path": "runs/x/sft/export"}}
    for cwd in (project, project / "runs" / "x", tmp_path):
        monkeypatch.chdir(cwd)
        assert _base_model_path(run.relative_to(cwd) if cwd != tmp_path else run, config).resolve() == export
    moved = shutil.move(project, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    assert _base_model_path(moved / "runs" / "x" / "ppo", config) == moved / "runs" / "x" / "sft" / "export"
    renamed = shutil.move(moved / "runs" / "x" / "ppo", moved / "runs" / "x" / "ppo_old")  # started where? here
    with pytest.raises(UserError, match=r"ppo_old/config.json: the run's base model, "
                                                 r"model.path='runs/x/sft/export', is not in .* \(a relative"):
        _base_model_path(renamed, config)


def test_every_flag_reaches_the_setting_it_names(monkeypatch, tmp_path):
    """What `python -m rlhf_jax.evaluate` runs: each flag, set away from its default, in the eval config."""
    from rlhf_jax.stages import dispatch

    seen = []
    monkeypatch.setattr(dispatch, "run", seen.append)
    argv = ["--policy", "a", "b", "--reference", "ref", "--reward-model", "rm", "--prompts", "p.txt",
            "--rankings", "r:eval", "--gold", "m:f", "--step", "7", "--runs", "x", "--out", str(tmp_path / "o"),
            "--limit", "5", "--samples", "2", "--max-new-tokens", "9", "--temperature", "0.5", "--top-k", "3",
            "--top-p", "0.8", "--batch-size", "16", "--max-prompt-tokens", "40", "--seed", "11", "--chat-template",
            "--dtype", "bfloat16", "--mesh-shape", "2,4,1"]
    assert evaluate.main(argv) == 0
    cfg, = seen
    e, s = cfg.eval, cfg.sampling
    assert (e.policies, e.reference, e.reward_model, e.prompts, e.rankings, e.gold, e.step, e.runs, e.out, e.limit,
            e.samples) == (("a", "b"), "ref", "rm", "p.txt", "r:eval", "m:f", 7, ("x",), str(tmp_path / "o"), 5, 2)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.batch_size, s.max_prompt_tokens) == (
        9, 0.5, 3, 0.8, 16, 40)
    assert (cfg.seed, cfg.data.chat_template, cfg.model.dtype, tuple(cfg.mesh.shape), cfg.run_dir) == (
        11, True, "bfloat16", (2, 4, 1), str(tmp_path / "o"))
    assert evaluate.main([*argv[:-2], "--all-steps", "--step", "0"]) == 0 and seen[1].eval.all_steps


def test_the_evaluator_samples_and_scores_over_the_references_tokenizer_ids(tmp_path):
    """A reference of 96 vocabulary rows read with a tokenizer of 40 ids (as Qwen2.5's): the policies are sampled,
    and their KL taken, over those 40 (`SamplingParams.vocab`), at the sampling temperature (0.5 here)."""
    from hf_fixtures import VOCAB, make_hf_model, make_tokenizer
    from rlhf_jax.config import load_config
    from rlhf_jax.eval.evaluate import Evaluator
    from rlhf_jax.runtime import sharding

    make_hf_model("qwen2", tmp_path)
    tokenizer = make_tokenizer(tmp_path, pad_is_eos=False)
    cfg = load_config(None, ["stage=eval", f"eval.reference={tmp_path}", "sampling.batch_size=8",
                             "sampling.max_prompt_tokens=8", "sampling.max_new_tokens=4", "sampling.temperature=0.5"])
    evaluator = Evaluator(cfg, ["w1 w2", "w3"], None, sharding.make_mesh([-1, 1, 1], ("data", "fsdp", "tensor")))
    assert evaluator.programs.p.vocab == len(tokenizer) < VOCAB
    # the KL's log-probs are over those 40 ids too: a policy's log-probs of its own samples as the sampler drew them
    from rlhf_jax.models.sampling import teacher_forced_logprobs

    model, params = evaluator.ref_model, evaluator.ref_params
    _, _, ids, mask = evaluator.batches[0]
    samples = evaluator.programs.sample(model, params, ids, mask, jax.random.key(3))
    got = evaluator.programs.logprobs(model, params, ids, mask, samples)
    forced = [jax.jit(lambda p, v=v, t=t: teacher_forced_logprobs(model, p, ids, mask, samples.tokens, samples.mask,
                                                                  t, vocab=v))(params)
              for v, t in ((len(tokenizer), 0.5), (None, 0.5), (len(tokenizer), 1.0))]
    np.testing.assert_allclose(got, forced[0], atol=1e-5)
    assert np.abs(got - np.asarray(forced[1]))[samples.mask].min() > 1e-3  # the limit changes every log-prob
    assert np.abs(got - np.asarray(forced[2]))[samples.mask].max() > 1e-3  # and so does the temperature
