"""Iterated rounds of a pipeline (`rounds`, `repeat`): which steps run, where, and what each round reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_jax import pipeline
from rlhf_jax.typed_yaml import ConfigError

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
ROUNDS = ["rounds=3", "repeat=[label, rm, dpo, ppo, eval]"]


def _steps(*overrides):
    run_dir, steps = pipeline.load(DEMO, ["run_dir=/runs/demo", *overrides])
    return {step.name: step.cfg for step in steps}


def test_repeated_steps_run_once_per_round_in_their_own_directories():
    steps = _steps(*ROUNDS)
    assert list(steps) == ["task", "pretrain", "sft"] + [f"round{r}/{name}" for r in (1, 2, 3)
                                                         for name in ("label", "rm", "dpo", "ppo", "eval")]
    assert steps["round2/rm"].run_dir == "/runs/demo/round2/rm"
    assert steps["sft"].run_dir == "/runs/demo/sft"


def test_round_one_starts_from_the_sft_model_and_reads_its_own_round():
    steps = _steps(*ROUNDS)
    label, rm, ppo, ev = (steps[f"round1/{n}"] for n in ("label", "rm", "ppo", "eval"))
    assert label.model.path == rm.model.path == ppo.model.path == "/runs/demo/sft/export"
    assert label.label.dataset == rm.data.name == "rankings_round1"
    assert not label.label.include and not ppo.ppo.reference and not ppo.ppo.value_model
    assert ppo.ppo.reward_model == "/runs/demo/round1/rm/export"
    assert ev.eval.policies == ("/runs/demo/round1/dpo/export", "/runs/demo/round1/ppo/export")
    assert ev.eval.reward_model == "/runs/demo/round1/rm/export"
    assert ev.eval.rankings == "/runs/demo/data/rankings_round1:eval"
    assert ev.eval.reference == "/runs/demo/sft/export"  # not a repeated step: the same in every round
    assert ev.eval.out == "" and not ev.eval.rounds  # each round's report in its step's directory


def test_a_later_round_continues_from_the_previous_one_with_the_sft_reference():
    steps = _steps(*ROUNDS)
    label, rm, ppo = (steps[f"round3/{n}"] for n in ("label", "rm", "ppo"))
    assert label.model.path == "/runs/demo/round2/ppo/export"  # samples of the current policy
    assert label.label.include == ("/runs/demo/round1/label/rankings.jsonl", "/runs/demo/round2/label/rankings.jsonl")
    assert label.label.dataset == rm.data.name == "rankings_round3"
    assert rm.model.path == "/runs/demo/round2/rm/export"
    assert ppo.model.path == "/runs/demo/round2/ppo/export"
    assert ppo.ppo.value_model == "/runs/demo/round2/ppo/export_value"
    assert ppo.ppo.reference == "/runs/demo/sft/export"
    assert ppo.ppo.reward_model == "/runs/demo/round3/rm/export"
    dpo = steps["round3/dpo"]  # DPO on every round's rankings so far, from the SFT model
    assert dpo.data.name == "rankings_round3" and dpo.model.path == "/runs/demo/sft/export"
    ev = steps["round3/eval"]
    assert ev.eval.rounds == ("/runs/demo/round1/eval", "/runs/demo/round2/eval") and ev.eval.out == ""


def _demo_with(tmp_path, replace: dict, rounds: int, repeat: list[str]):
    """configs/demo.yaml in rounds, with steps replaced in place (`replace`: name -> (new name, body), or None to
    drop the step); its steps keyed by name."""
    import yaml

    config = yaml.safe_load(Path(DEMO).read_text())
    config["pipeline"] = dict(replace.get(name, (name, body)) for name, body in config["pipeline"].items()
                              if replace.get(name, ()) is not None)
    if "eval" in config["pipeline"]:
        config["pipeline"]["eval"]["eval"].update(policies=[f"{{run_dir}}/{repeat[-1]}/export"], runs=[])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, "rounds": rounds, "repeat": repeat}, sort_keys=False))
    _, loaded = pipeline.load(str(tmp_path / "c.yaml"), ["run_dir=/runs/demo"])
    return {step.name: step.cfg for step in loaded}


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_a_later_round_of_grpo_continues_from_its_policy(tmp_path, stage):
    body = {"stage": stage, "model": {"path": "{run_dir}/sft/export"}, "data": {"name": "prompts"},
            "train": {"steps": 5}, stage: {"reward_model": "{run_dir}/rm/export"}}
    steps = _demo_with(tmp_path, {"dpo": None, "ppo": (stage, body)}, 3, ["label", "rm", stage])
    label, rm, policy = (steps[f"round3/{n}"] for n in ("label", "rm", stage))
    assert label.model.path == policy.model.path == f"/runs/demo/round2/{stage}/export"
    section = getattr(policy, stage)
    assert section.reference == "/runs/demo/sft/export"  # the KL reference stays round one's model
    assert section.reward_model == "/runs/demo/round3/rm/export" and rm.model.path == "/runs/demo/round2/rm/export"
    first = steps[f"round1/{stage}"]
    assert first.model.path == "/runs/demo/sft/export" and not getattr(first, stage).reference


def test_a_reference_set_by_the_user_stays_the_kl_reference_in_every_round():
    steps = _steps(*ROUNDS, "pipeline.ppo.ppo.reference=/models/reference")
    assert [steps[f"round{r}/ppo"].ppo.reference for r in (1, 2, 3)] == ["/models/reference"] * 3
    assert steps["round3/ppo"].model.path == "/runs/demo/round2/ppo/export"


def test_steps_after_the_repeated_ones_run_once_on_the_last_rounds_results():
    steps = _steps("rounds=2", "repeat=[label, rm, dpo, ppo]")
    assert list(steps)[-2:] == ["round2/ppo", "eval"]
    ev = steps["eval"].eval
    assert ev.policies == ("/runs/demo/round2/dpo/export", "/runs/demo/round2/ppo/export")
    assert ev.reward_model == "/runs/demo/round2/rm/export" and ev.rankings == "/runs/demo/data/rankings_round2:eval"


def test_dpo_rounds_rank_samples_of_the_last_dpo_policy(tmp_path):
    steps = _demo_with(tmp_path, {"ppo": None, "eval": None}, 2, ["label", "rm", "dpo"])
    assert steps["round2/label"].model.path == "/runs/demo/round1/dpo/export"  # new rankings of the current policy
    dpo = steps["round2/dpo"]  # retrained from the SFT model on both rounds' rankings
    assert dpo.model.path == "/runs/demo/sft/export" and dpo.data.name == "rankings_round2"
    assert steps["round2/label"].label.include == ("/runs/demo/round1/label/rankings.jsonl",)


def test_rm_init_sft_retrains_each_round_from_the_sft_model():
    steps = _steps(*ROUNDS, "pipeline.rm.rm.init=sft")
    assert steps["round2/rm"].model.path == "/runs/demo/sft/export"


def test_without_rounds_the_pipeline_is_unchanged():
    steps = _steps()
    assert list(steps) == ["task", "pretrain", "sft", "label", "rm", "dpo", "ppo", "eval"]
    assert steps["rm"].data.name == "rankings" and steps["ppo"].ppo.reward_model == "/runs/demo/rm/export"


@pytest.mark.parametrize("overrides, fragment", [
    (["rounds=0", "repeat=[rm]"], "rounds: expected a whole number >= 1, got 0"),
    (["rounds=2"], "repeat: expected a list of the step names repeated each round, got None"),
    (["rounds=2", "repeat=[rm, nope]"], "repeat: no step 'nope'"),
    (["rounds=2", "repeat=[label, ppo]"], "must name consecutive steps in the pipeline's order"),
    (["rounds=2", "repeat=[1"], "override 'repeat': invalid YAML value"),
])
def test_bad_rounds_fail_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _steps(*overrides)


def _report(gold: list[float], kls: list[float], accuracy: float) -> dict:
    policies = [{"name": f"ppo@{25 * (i + 1)}", "step": 25 * (i + 1), "kl": kl, "score_mean": 1.0 + i,
                 "gold_score_mean": g, "win_rate": 0.9, "win_rate_ci": (0.8, 0.95)}
                for i, (g, kl) in enumerate(zip(gold, kls))]
    return {"reference": {"path": "sft", "gold_score_mean": -0.1, "score_mean": 0.0}, "policies": policies,
            "rm_accuracy": accuracy, "prompts": 10, "seed": 0}


def test_the_report_shows_each_round_and_its_frontier(tmp_path):
    from rlhf_jax.eval.evaluate import read_round, round_row
    from rlhf_jax.eval.report import write_report

    first = tmp_path / "round1"
    write_report(first, _report([0.5, 0.9], [1.0, 2.0], 0.75), [])
    current = _report([1.0, 1.2, 1.1], [2.5, 3.0, 3.5], 0.78)
    current["rounds"] = [round_row(read_round(str(first))), round_row(current)]
    written = write_report(tmp_path / "round2", current, [])
    assert {p.name for p in written} >= {"rounds.png", "gold_vs_kl.png", "report.md"}
    assert [r["gold_score_mean"] for r in current["rounds"]] == [0.9, 1.1]  # each round's last checkpoint
    assert [len(r["checkpoints"]) for r in current["rounds"]] == [2, 3]  # the frontiers drawn
    table = (tmp_path / "round2" / "report.md").read_text().split("## Rounds")[1]
    assert "| 1 | 0.900 | 2.000 | 2.000 | 0.750 |" in table
    assert "| 2 | 1.100 | 3.000 | 3.500 | 0.780 |" in table


def test_a_missing_earlier_round_is_one_line(tmp_path):
    from rlhf_jax.errors import UserError
    from rlhf_jax.eval.evaluate import read_round

    with pytest.raises(UserError, match=f"eval.rounds: {tmp_path}/report.json cannot be read"):
        read_round(str(tmp_path))


def test_ppo_reference_is_the_kl_reference_and_must_be_the_policys_kind(tmp_path):
    """A later round's PPO continues from its last policy but keeps the SFT model as the KL reference: the
    frozen reference params are ppo.reference's; a reward model or another architecture there is one line."""
    import jax
    import numpy as np

    from rlhf_jax.errors import UserError
    from rlhf_jax.models.checkpoint import load_model, save_model
    from rlhf_jax.models.tiny import build_tiny_model
    from rlhf_jax.models.transformer import make_model
    from rlhf_jax.stages.policy_common import reference_params
    from rlhf_jax.training.state import initial_params, with_head

    policy, sft = build_tiny_model(tmp_path / "policy", seed=0), build_tiny_model(tmp_path / "sft", seed=1)
    loaded = load_model(policy)
    model = make_model(loaded.cfg)
    own = initial_params(loaded, model, 0)

    def reference(path: str):
        return reference_params(path, "ppo.reference", loaded, model, own, 0)

    assert reference_params("", "ppo.reference", loaded, model, own, 0) is own
    expected = initial_params(load_model(sft), model, 0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reference(str(sft))), jax.tree.leaves(expected)))
    rm = save_model(tmp_path / "rm", jax.tree.map(np.asarray, with_head(loaded.params, loaded.cfg, "lm", "scalar",
                                                                         jax.random.key(1))),
                    loaded.cfg, "scalar", policy)
    with pytest.raises(UserError, match=f"ppo.reference={rm}: a reward/value model"):
        reference(str(rm))
    other = build_tiny_model(tmp_path / "gpt2", seed=0, family="gpt2")
    with pytest.raises(UserError, match="its architecture differs from model.path's"):
        reference(str(other))


def test_a_finished_label_step_stays_finished_when_only_its_serving_settings_change(tmp_path):
    """label.finish=true (write what people ranked) or another port on a rerun do not redo the step; another
    dataset name does."""
    import json

    from rlhf_jax.config import config_to_dict, load_config
    from rlhf_jax.errors import UserError

    run_dir = tmp_path / "run"

    def step(*overrides):
        cfg = load_config(None, ["stage=label", f"run_dir={run_dir}/label", *overrides])
        return pipeline.Step("label", cfg), pipeline._relative(config_to_dict(cfg), str(run_dir))

    done, config = step("label.finish=true", "label.port=9000")
    (run_dir / "label").mkdir(parents=True)
    (run_dir / "label" / pipeline.MARKER).write_text(json.dumps(
        {"config": config_to_dict(done.cfg), "summary": {"stage": "label"}, "upstream": "u"}))
    again, config = step("label.port=9001")
    assert pipeline._finished(again, config, "u", ())["summary"] == {"stage": "label"}
    other, config = step("label.dataset=other")
    with pytest.raises(UserError, match="finished earlier with other settings"):
        pipeline._finished(other, config, "u", ())
    # nor the steps after it: they compare the steps before them without the serving keys
    as_run = [{"config": pipeline._relative(config_to_dict(done.cfg), str(run_dir)), "summary": {"stage": "label"}}]
    rerun = [{"config": pipeline._relative(config_to_dict(again.cfg), str(run_dir)), "summary": {"stage": "label"}}]
    assert pipeline._fingerprint(as_run) == pipeline._fingerprint(rerun)
    assert pipeline._fingerprint(as_run, "serving") != pipeline._fingerprint(rerun, "serving")  # older markers' form
