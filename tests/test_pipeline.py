"""The pipeline config: steps validated up front with shared and per-step overrides, {run_dir} substituted,
finished steps skipped and a finished step with other settings refused in one line; labeling's grouping of
responses; and the main job shortened (the bundled task's own tests: tests/test_task_sentiment.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing

import pytest

from rlhf_jax import main as main_cli
from rlhf_jax import pipeline
from rlhf_jax.config import Config
from rlhf_jax.typed_yaml import ConfigError

from cli_helpers import run_quietly

PIPELINE = """
run_dir: {root}/run
seed: 3
train: {{batch_size: 16}}
pipeline:
  first:
    stage: generate
    generate: {{prompt_file: "{root}/prompts.txt", output: "{{run_dir}}/first.jsonl"}}
    sampling: {{max_new_tokens: 4, batch_size: 8}}
  second:
    stage: sft
    model: {{path: "{{run_dir}}/first/export"}}
    data: {{name: demos}}
    train: {{steps: 5}}
"""


def _write(tmp_path, text=PIPELINE) -> str:
    path = tmp_path / "pipe.yaml"
    path.write_text(text.format(root=tmp_path))
    return str(path)


def test_steps_merge_shared_keys_substitute_run_dir_and_take_overrides(tmp_path):
    run_dir, steps = pipeline.load(_write(tmp_path), ["seed=5", "pipeline.second.train.steps=7"])
    assert run_dir == tmp_path / "run" and [s.name for s in steps] == ["first", "second"]
    first, second = (s.cfg for s in steps)
    assert first.run_dir == f"{tmp_path}/run/first" and second.run_dir == f"{tmp_path}/run/second"
    assert first.generate.output == f"{tmp_path}/run/first.jsonl"
    assert second.model.path == f"{tmp_path}/run/first/export"
    assert first.seed == second.seed == 5 and second.train.steps == 7
    assert second.train.batch_size == 16 and first.sampling.batch_size == 8  # shared and own keys together
    # a key for every step also sets it where a step sets it itself; of two on one key the later wins
    _, steps = pipeline.load(_write(tmp_path), ["sampling.batch_size=16", "train.steps=9",
                                                "pipeline.second.train.steps=3"])
    assert [s.cfg.sampling.batch_size for s in steps] == [16, 16] and steps[1].cfg.train.steps == 3
    _, steps = pipeline.load(_write(tmp_path), ["pipeline.second.train.steps=3", "train.steps=9"])
    assert steps[1].cfg.train.steps == 9
    dotted = PIPELINE.replace("  second:", "  second.v2:")  # a step name with a dot takes its own overrides
    _, steps = pipeline.load(_write(tmp_path, dotted), ["pipeline.second.v2.train.steps=4"])
    assert steps[1].name == "second.v2" and steps[1].cfg.train.steps == 4
    both = PIPELINE + "  second.v2:" + PIPELINE.split("  second:")[1]
    _, steps = pipeline.load(_write(tmp_path, both), ["pipeline.second.v2.train.steps=4"])  # not second's
    assert [(s.name, s.cfg.train.steps) for s in steps[1:]] == [("second", 5), ("second.v2", 4)]


@pytest.mark.parametrize("text, overrides, fragment", [
    (PIPELINE.replace("steps: 5", "stepz: 5"), [], "pipeline.second: unknown key 'train.stepz'"),
    (PIPELINE, ["pipeline.third.seed=1"], "no step 'third'"),
    (PIPELINE, ["pipeline.second.train.steps=-1"], "pipeline.second: 'train.steps' must be >= 0"),
    (PIPELINE.replace("    stage: sft\n", ""), [], "pipeline.second: expects a stage config with its `stage`"),
    (PIPELINE + "  third:\n", ["pipeline.third.train.steps=3"], "pipeline.third: expects a stage config with its"),
    (PIPELINE.replace("    stage: sft\n", "    stage: sft\n    run_dir: elsewhere\n"), [],
     "a step runs in"),
    ("run_dir: x\npipeline: []\n", [], "'pipeline' expects a mapping"),
    (PIPELINE + "  report:\n    stage: eval\n    eval: {{policies: [a]}}\n", [],
     "pipeline.report: stage 'eval' needs eval.reference"),
    (PIPELINE + "  data:\n    stage: prepare\n    prepare: {{format: csv, inputs: [x], name: d}}\n", [],
     "pipeline.data: prepare.format='csv': unknown"),
    (PIPELINE + "  data:\n    stage: prepare\n    prepare: {{format: jsonl_sft, name: d}}\n", [],
     "pipeline.data: stage 'prepare' needs prepare.inputs"),
    # found by --check too, not when the step starts after the ones before it have trained
    (PIPELINE, ["pipeline.second.optim.grad_accum_steps=3"], "pipeline.second: train.batch_size=16 is not divisible"),
    (PIPELINE, ["pipeline.second.train.steps=0"], "pipeline.second: set train.steps or train.epochs"),
    (PIPELINE, ["pipeline.second.data.pack=true", "pipeline.second.train.steps=0", "pipeline.second.train.epochs=1"],
     "pipeline.second: train.epochs cannot be used with data.pack"),
    # the schema before anything reads a section; overrides and run_dir as the rest of the config
    (PIPELINE.replace("train: {{batch_size: 16}}", "data: [1]"), [], "'data' expects a mapping, got [1]"),
    (PIPELINE.replace("run_dir: {root}/run", "run_dir:"), [], "'run_dir' expects the pipeline's directory"),
    (PIPELINE, ["run_dir="], "'run_dir' expects the pipeline's directory, got ''"),
    (PIPELINE, ["pipeline.second.model.path"], "override 'pipeline.second.model.path' must look like key=value"),
    (PIPELINE, ["pipeline.second=1"], "override 'pipeline.second' names a step; set its keys"),
    (PIPELINE + "  rl:\n    stage: rloo\n    model: {{path: m}}\n    data: {{name: p}}\n", [],
     "pipeline.rl: stage 'rloo' needs rloo.reward_model"),
    (PIPELINE + "  rank:\n    stage: label\n    model: {{path: m}}\n    data: {{name: p}}\n"
                "    label: {{labeler: 'no_such_module:f'}}\n", [],
     "pipeline.rank: label.labeler='no_such_module:f': cannot import"),
])
def test_bad_pipelines_fail_before_any_step_runs(tmp_path, text, overrides, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        pipeline.load(path, overrides)
    rc, _, err = run_quietly(main_cli.main, ["--config", path, *overrides])
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ") and fragment in err
    assert not (tmp_path / "run").exists()


def test_a_finished_step_is_skipped_and_one_with_other_settings_is_refused(tmp_path):
    (tmp_path / "prompts.txt").write_text("Hello there\nOnce upon a time\n")
    path = _write(tmp_path, PIPELINE.split("  second:")[0])
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    marker = json.loads((tmp_path / "run" / "first" / pipeline.MARKER).read_text())
    assert marker["summary"]["prompts"] == 2 and marker["config"]["seed"] == 3
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[1/1] first: finished earlier, skipped" in err
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "pipeline.first.sampling.max_new_tokens=5"])
    assert rc == 2 and "pipeline.first: finished earlier with other settings (sampling.max_new_tokens: 4 -> 5)" in err


def test_a_finished_steps_changed_settings_stop_the_run_before_any_step_runs(tmp_path):
    """As when a round is added to a pipeline with steps after the repeated ones: the refusal comes before the steps
    before it have run again (trained a whole round), not after."""
    path = _two_generate_steps(tmp_path)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    shutil.rmtree(tmp_path / "run" / "first")  # to run again
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "pipeline.again.sampling.max_new_tokens=5"])
    assert rc == 2 and err.strip().splitlines()[-1].startswith(
        "error: pipeline.again: finished earlier with other settings (sampling.max_new_tokens: 4 -> 5)"), err
    assert "[1/2] first" not in err and not (tmp_path / "run" / "first").exists()


def test_a_rounds_first_step_that_made_nothing_leaves_no_round_directory(tmp_path, monkeypatch):
    from rlhf_jax.errors import UserError
    from rlhf_jax.stages import dispatch

    (tmp_path / "prompts.txt").write_text("Hello there\n")
    path = _write(tmp_path, PIPELINE.split("  second:")[0] + "rounds: 2\nrepeat: [first]\n")
    real_run = dispatch.run

    def failing_in_round_2(cfg):
        if "/round2/" in cfg.run_dir:
            raise UserError("round 2 failed before writing anything")
        return real_run(cfg)

    monkeypatch.setattr(dispatch, "run", failing_in_round_2)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 2 and "round 2 failed" in err and (tmp_path / "run" / "round1" / "first").is_dir(), err[-2000:]
    assert not (tmp_path / "run" / "round2").exists()


def test_a_step_after_one_that_came_out_differently_is_refused(tmp_path):
    """Steps finished after an earlier step whose results have changed since (it ran again) are stale: the refusal
    names every finished step after it too, which would otherwise be refused one by one, each after the step
    before it has run again."""
    (tmp_path / "prompts.txt").write_text("Hello there\n")
    step = PIPELINE.split("  second:")[0].split("pipeline:\n")[1]
    text = PIPELINE.split("  second:")[0] + "".join(step.replace("first", name) for name in ("again", "third"))
    path = _write(tmp_path, text)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[3/3] third: done" in err, err[-2000:]
    marker = tmp_path / "run" / "first" / pipeline.MARKER
    recorded = json.loads(marker.read_text())
    recorded["summary"]["new_tokens"] += 1  # what a rerun that came out differently leaves
    marker.write_text(json.dumps(recorded))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 2 and err.strip().splitlines()[-1] == (
        "error: pipeline.again: finished earlier after other steps before it (one was added or removed, or ran "
        f"again and came out differently); delete {tmp_path / 'run' / 'again'} {tmp_path / 'run' / 'third'} to run "
        "it and the finished step after it again"), err[-2000:]


def test_a_finished_step_stays_finished_when_a_section_its_stage_does_not_read_changes(tmp_path):
    """A shared override reaches every step: optim.lr on generate steps (which do not read it) leaves them and the
    steps after them finished; markers written before the per-stage comparison (their upstream over every section)
    still count."""
    (tmp_path / "prompts.txt").write_text("Hello there\n")
    text = PIPELINE.split("  second:")[0] + PIPELINE.split("  second:")[0].split("pipeline:\n")[1].replace(
        "first:", "again:").replace("first.jsonl", "again.jsonl")
    path = _write(tmp_path, text)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "optim.lr=0.5", "train.steps=3"])
    assert rc == 0 and "[1/2] first: finished earlier" in err and "[2/2] again: finished earlier" in err, err
    marker = tmp_path / "run" / "again" / pipeline.MARKER
    first = json.loads((tmp_path / "run" / "first" / pipeline.MARKER).read_text())
    records = [{key: pipeline._relative(first[key], str(tmp_path / "run")) for key in ("config", "summary")}]
    marker.write_text(json.dumps({**json.loads(marker.read_text()),
                                  "upstream": pipeline._fingerprint(records, "full")}))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[2/2] again: finished earlier" in err, err[-2000:]
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "optim.lr=0.5"])  # the marker now has this scheme's
    assert rc == 0 and "[2/2] again: finished earlier" in err, err[-2000:]
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "sampling.temperature=0.5"])  # read by generate
    assert rc == 2 and "pipeline.first: finished earlier with other settings (sampling.temperature" in err
    run = tmp_path / "run"  # the finished step after it, refused in turn once this one ran again, is named too
    assert err.strip().endswith(f"; delete {run / 'first'} {run / 'again'} to run it and the finished step after it "
                                "again"), err


def test_a_finished_step_stays_finished_on_another_mesh_runtime_or_log_cadence(tmp_path):
    """How a step runs is not what it makes: a run carried on with another mesh, compile cache or log cadence keeps
    its finished steps, and markers that counted those keys (their upstream in the "layout" form) still count."""
    path = _two_generate_steps(tmp_path)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    layout = ["mesh.shape=[1,-1,1]", "runtime.compile_cache=", "train.log_every=3"]
    rc, _, err = run_quietly(main_cli.main, ["--config", path, *layout])
    assert rc == 0 and "[1/2] first: finished earlier" in err and "[2/2] again: finished earlier" in err, err
    marker = tmp_path / "run" / "again" / pipeline.MARKER
    first = json.loads((tmp_path / "run" / "first" / pipeline.MARKER).read_text())
    records = [{key: pipeline._relative(first[key], str(tmp_path / "run")) for key in ("config", "summary")}]
    assert pipeline._fingerprint(records, "layout") != pipeline._fingerprint(records)
    marker.write_text(json.dumps({**json.loads(marker.read_text()),
                                  "upstream": pipeline._fingerprint(records, "layout")}))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[2/2] again: finished earlier" in err, err[-2000:]
    assert json.loads(marker.read_text())["upstream"] == pipeline._fingerprint(records)  # rewritten in this form


def _two_generate_steps(tmp_path) -> str:
    (tmp_path / "prompts.txt").write_text("Hello there\n")
    return _write(tmp_path, PIPELINE.split("  second:")[0] + PIPELINE.split("  second:")[0].split("pipeline:\n")[1]
                  .replace("first:", "again:").replace("first.jsonl", "again.jsonl"))


def test_a_run_dir_given_relative_keeps_its_finished_steps_from_any_working_directory(tmp_path, monkeypatch):
    """Summaries name absolute paths in the run_dir (as training stages' exports do): the markers hold them
    relative to the run_dir, so they read the same from anywhere."""
    path = _two_generate_steps(tmp_path)
    output = f"pipeline.first.generate.output={tmp_path / 'run' / 'first.jsonl'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "run_dir=run", output])
    assert rc == 0, err[-2000:]
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, _, err = run_quietly(main_cli.main, ["--config", path, f"run_dir={tmp_path / 'run'}", output])
    assert rc == 0 and "[2/2] again: finished earlier" in err, err[-2000:]


def test_a_step_started_after_other_steps_does_not_resume_their_checkpoints(tmp_path):
    """A step interrupted with checkpoints, then a step before it rerun and come out differently: the step would
    resume from checkpoints of the old inputs, so it is refused; after the same steps, it resumes. A step that
    fails having made nothing leaves no directory."""
    path = _two_generate_steps(tmp_path)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    again = tmp_path / "run" / "again"
    started = json.loads((again / pipeline.STARTED).read_text())
    shutil.rmtree(again)  # killed mid-way: no marker, no output, a checkpoint
    (tmp_path / "run" / "again.jsonl").unlink()
    (again / "checkpoints" / "100").mkdir(parents=True)
    (again / pipeline.STARTED).write_text(json.dumps({"upstream": "the steps before it as they were"}))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    refusal = (f"error: pipeline.again: started earlier after other steps before it, which came out differently "
               f"since; what it saved (checkpoints, a labeling task) is of that run: delete {again} to run it again")
    assert rc == 2 and err.strip().splitlines()[-1] == refusal, err[-2000:]
    shutil.rmtree(again / "checkpoints")
    (again / "label.db").write_bytes(b"")  # a labeling task people were ranking: as much the old run's
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 2 and err.strip().splitlines()[-1] == refusal, err[-2000:]
    (again / "label.db").unlink()
    (again / pipeline.STARTED).write_text(json.dumps(started))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[2/2] again: done" in err, err[-2000:]
    shutil.rmtree(again)
    (tmp_path / "run" / "again.jsonl").unlink()
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "pipeline.again.generate.prompt_file=/no/such.txt"])
    assert rc == 2 and "/no/such.txt: file not found" in err and not again.exists(), err[-2000:]
    again.mkdir()  # started after other steps, but saved nothing to resume from: it simply runs
    (again / pipeline.STARTED).write_text(json.dumps({"upstream": "the steps before it as they were"}))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[2/2] again: done" in err, err[-2000:]


def test_timings_of_a_step_leave_the_steps_after_it_valid():
    """A step rerun to the same results in another time: its summary's *_s keys and seconds are not its results."""
    record = lambda **summary: [{"config": {"stage": "sft", "seed": 1}, "summary": {"loss": 1.5, **summary}}]
    same = pipeline._fingerprint(record(seconds=3, tokens_per_s=10.0, export_s=1))
    assert pipeline._fingerprint(record(seconds=9, tokens_per_s=20.0, export_s=2)) == same
    assert pipeline._fingerprint(record(seconds=3, tokens_per_s=10.0, export_s=1, loss=1.25)) != same


def test_every_stage_names_the_sections_it_reads_and_every_section_is_read():
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}
    assert set(pipeline.STAGE_SECTIONS) == set(typing.get_args(hints["stage"]))
    read = {s for names in pipeline.STAGE_SECTIONS.values() for s in names}
    assert read <= sections and sections - read == set(), sections - read


# -------------------------------------------------------------------------------- labeling the demo task


def test_labeling_merges_identical_drops_empty_and_checks_ranks():
    from rlhf_jax.errors import UserError
    from rlhf_jax.stages.label import Sample, _check_ranks, group_responses

    texts = [" a", " a", " b", "", " c", " ", " c", ""]  # prompt 1: a, a, b, ""; prompt 2: c, " ", c, ""
    ended = [False, True, False, True, True, True, True, True]  # " a" ended once: it ended
    samples = [[Sample(t, {"policy": "m", "step": None}, e) for t, e in zip(texts[i:i + 4], ended[i:i + 4])]
               for i in (0, 4)]
    # 3 empty dropped; a second " a" and a second " c" merged (the latter's prompt then has one response)
    assert group_responses(["p1", "p2"], samples) == (["p1"], [[" a", " b"]], [[True, False]], 3, 2)
    _check_ranks([[1, 0]], [[" a", " b"]], "m:f")
    for bad in ([[0]], [[0, 2]], [[0.5, 1]], [[True, 0]]):
        with pytest.raises(UserError, match="label.labeler=m:f: prompt 0"):
            _check_ranks(bad, [[" a", " b"]], "m:f")


# ------------------------------------------------------------------------------------- the main job, shortened


def test_the_demo_pipeline_shortened_shows_every_effect_and_resumes_to_the_same_report(demo_run):
    """configs/demo.yaml with fewer steps (conftest.SHORT_DEMO): the RM beats chance, PPO raises the score and the
    gold score over SFT's while its KL stays under the target, DPO raises the gold score too. Then the state a kill would leave (PPO between
    checkpoints, labeling unfinished) reruns with the same command to the same report."""
    run_dir, report = demo_run["dir"], demo_run["report"]
    dpo, ppo = report["policies"]  # the verdict speaks of the last one
    assert dpo["name"] == "dpo/export" and ppo["name"] == "ppo/export", report["policies"]
    assert dpo["gold_score_mean"] > report["reference"]["gold_score_mean"] and dpo["gold_win_rate"] > 0.5, dpo
    assert report["rm_accuracy"] > 0.55, report  # above chance (the labeler's ceiling is about 0.78)
    assert ppo["gold_score_mean"] > report["reference"]["gold_score_mean"] and ppo["gold_win_rate"] > 0.5, ppo
    assert 0 < ppo["kl"] < 4.0, ppo  # configs/demo.yaml: ppo.kl_target 4
    scores = [json.loads(line)["score_mean"] for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert scores[-1] > scores[0], scores
    last_lines = demo_run["stderr"].strip().splitlines()[-3:]
    assert last_lines[0].startswith("RLHF improved the policy"), last_lines

    for path in (run_dir / "ppo" / pipeline.MARKER, run_dir / "label" / pipeline.MARKER, run_dir / "report.json"):
        path.unlink()
    for path in (run_dir / "ppo" / "export", run_dir / "ppo" / "checkpoints" / "24", run_dir / "eval"):
        shutil.rmtree(path)
    rc, _, err = run_quietly(main_cli.main, demo_run["argv"])
    assert rc == 0, err[-3000:]
    assert "[5/8] rm: finished earlier, skipped" in err and "[6/8] dpo: finished earlier, skipped" in err and "resumed from" in err and "at step 16" in err
    assert json.loads((run_dir / "report.json").read_text()) == report


def test_what_to_delete_to_run_a_step_again_names_every_finished_step_after_it(tmp_path):
    from rlhf_jax.config import load_config

    steps = []
    for name in ("first", "second", "third", "fourth"):
        steps.append(pipeline.Step(name, load_config(None, [f"run_dir={tmp_path / name}"])))
        if name != "third":  # not finished: nothing of it to delete
            (tmp_path / name).mkdir()
            (tmp_path / name / pipeline.MARKER).write_text(json.dumps(
                {"config": {"run_dir": f"{{run_dir}}/{name}"}, "summary": {}, "upstream": ""}))
    first, second, _, fourth = (str(tmp_path / n) for n in ("first", "second", "third", "fourth"))
    assert pipeline._delete_to_rerun(steps[0], tuple(steps[1:])) == (
        f"delete {first} {second} {fourth} to run it and the 2 finished steps after it again")
    assert pipeline._delete_to_rerun(steps[1], tuple(steps[2:])) == (
        f"delete {second} {fourth} to run it and the finished step after it again")
    assert pipeline._delete_to_rerun(steps[3], ()) == f"delete {fourth} to run it again"


def test_steps_finished_by_a_version_with_fewer_config_keys_stay_finished(tmp_path):
    """An upgrade that adds a config key (at its default) made every finished step's config differ from today's:
    the step read the same settings, but the steps after it were fingerprinted anew and refused ("finished earlier
    after other steps before it"), an interrupted one too, so no pipeline of an older version resumed."""
    path = _two_generate_steps(tmp_path)
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0, err[-2000:]
    first_marker, again_marker = (tmp_path / "run" / name / pipeline.MARKER for name in ("first", "again"))
    first = json.loads(first_marker.read_text())
    del first["config"]["sampling"]["top_p"]  # as a version before that key wrote it
    first_marker.write_text(json.dumps(first))
    older = [{"config": pipeline._relative(first["config"], str(tmp_path / "run")), "summary": first["summary"]}]
    again_marker.write_text(json.dumps({**json.loads(again_marker.read_text()),
                                        "upstream": pipeline._fingerprint(older)}))
    rc, _, err = run_quietly(main_cli.main, ["--config", path])
    assert rc == 0 and "[1/2] first: finished earlier" in err and "[2/2] again: finished earlier" in err, err[-2000:]
    rc, _, err = run_quietly(main_cli.main, ["--config", path, "pipeline.first.sampling.top_p=0.5"])
    assert rc == 2 and "pipeline.first: finished earlier with other settings (sampling.top_p: null -> 0.5)" in err
