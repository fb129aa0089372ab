"""`stage: label` with `label.labeler: people` end to end through the CLI: the task sampled from two policies into
label.db, the page served until a thread of labelers has posted `label.target` rankings through the API, then the
rankings dataset an rm stage reads (ties give no pair, held-out prompts apart). A rerun keeps the task; a signal
stops serving with exit 4 and keeps what is stored; label.finish=true writes the dataset without serving."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.data.pipeline import open_split
from rlhf_jax.data.prepare import prepare
from rlhf_jax.label import store
from rlhf_jax.label.store import Store
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.stages.label import Sample, merge_responses

from cli_helpers import run_quietly

PROMPTS = [f"Say {w}:" for w in ("red", "cat", "sun", "blue", "dog", "tree", "moon", "fish")]
HELD_OUT = set(PROMPTS[6:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_stage")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    prepare("jsonl_prompts", [str(root / "prompts.jsonl")], root / "data", "prompts", eval_prompts=HELD_OUT)
    return {"root": root, "policy": build_tiny_model(root / "sft", seed=0),
            "other": build_tiny_model(root / "other", seed=1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(setup, run_dir, port: int, *more: str) -> list[str]:
    return ["stage=label", f"run_dir={run_dir}", f"model.path={setup['policy']}", f"data.dir={setup['root'] / 'data'}",
            "data.name=prompts", "label.labeler=people", "label.responses=2", f"label.policies=[{setup['other']}]",
            "label.dataset=labeled", f"label.port={port}", "label.overlap=0.5", "sampling.max_new_tokens=4",
            "sampling.max_prompt_tokens=16", *more]


def serving(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=5)
        return True
    except httpx.TransportError:
        return False


def labelers(port: int, rankings: int, posted: list, stop_with=None) -> threading.Thread:
    """Two labelers taking turns through the API once the page answers: each ranks its next prompt (the first
    response best, the others tied below it, or every response apart). After `rankings` posts, `stop_with` (a
    signal) is sent to this process; without one, SIGTERM is when the server has not stopped within a minute (a
    test that fails, rather than one that waits for ever)."""
    url = f"http://127.0.0.1:{port}"

    def run():
        try:
            deadline = time.monotonic() + 600  # sampling compiles first
            while not serving(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            for n in range(rankings):
                name = ("ann", "bob")[n % 2]
                task = httpx.get(f"{url}/api/next", params={"labeler": name}, timeout=30).json()
                ids = [r["id"] for r in task["responses"]]
                order = [[i] for i in ids] if n % 3 else [ids[:1], ids[1:]]
                answer = httpx.post(f"{url}/api/rankings", json={"labeler": name, "prompt_id": task["prompt_id"],
                                                                 "order": order}, timeout=30)
                posted.append((name, task["prompt"], [r["text"] for r in task["responses"]], order, answer.json()))
        finally:
            deadline = time.monotonic() + (0 if stop_with else 60)
            while serving(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if serving(port):
                os.kill(os.getpid(), stop_with or signal.SIGTERM)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def serving_nothing(port: int):
    """For a step that must not serve: should the page answer on `port`, SIGTERM stops the step (exit 4), so that
    the test fails instead of waiting for ever."""
    done = threading.Event()

    def watch():
        while not done.wait(0.2):
            if serving(port):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _rows(data_dir, split: str) -> list[dict]:
    source, _ = open_split(data_dir, "labeled", split)
    return [source[i] for i in range(len(source))]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_people_rank_through_the_api_until_the_target_and_the_rm_dataset_is_written(setup):
    run_dir, port, posted = setup["root"] / "run", _free_port(), []
    thread = labelers(port, 6, posted)
    rc, out, err = run_quietly(main_cli.main, _argv(setup, run_dir, port, "label.target=6"))
    thread.join(30)
    assert rc == 0, err[-3000:]
    assert "label: the ranking page is at http://127.0.0.1:" in err and "label: 100% (6/6 rankings" in err
    assert [p[4]["done"] for p in posted] == [1, 2, 3, 4, 5, 6]

    task = Store(run_dir / "label.db")
    assert len(task.prompts) == len(PROMPTS)  # tiny random models: every prompt has 2 distinct responses or more
    sources = {s["policy"] for p in task.prompts.values() for r in p.responses for s in r.sources}
    assert sources == {str(setup["policy"]), str(setup["other"])}
    assert all(2 <= len(p.responses) <= 4 for p in task.prompts.values())
    assert {p.text for p in task.prompts.values() if p.held_out} == HELD_OUT
    assert (task.meta["target"], task.meta["overlap"]) == (6, 0.5)  # what a later `label serve RUN_DIR` serves to

    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rankings"] == 6 and summary["labelers"] == 2 and summary["labeler"] == "people"
    data_dir = setup["root"] / "data"
    rows = {split: _rows(data_dir, split) for split in ("train", "eval")}
    expected_pairs = sum(len(a) * len(b) for *_, order, _ in posted for i, a in enumerate(order) for b in order[i + 1:])
    assert sum(len(r["better"]) for split in rows.values() for r in split) == expected_pairs == summary["pairs"]
    # a shared prompt's rankings by the two labelers stay two batch elements
    assert len({p[1] for p in posted}) < len(posted) == sum(len(split) for split in rows.values())
    ranked_held_out = {p[1] for p in posted if p[1] in HELD_OUT}
    assert ranked_held_out and {_text(r["prompt"]) for r in rows["eval"]} == ranked_held_out
    assert {_text(r["prompt"]) for r in rows["train"]} == {p[1] for p in posted} - HELD_OUT
    first = posted[0]  # its first response best, the rest tied: K - 1 pairs, the best one always better
    row = next(r for split in rows.values() for r in split if _text(r["prompt"]) == first[1])
    texts = [_text(t) for t in row["responses"]]
    best = texts.index(first[2][0])
    assert {int(b) for b in row["better"][:len(first[2]) - 1]} == {best}

    # a rerun keeps the stored task: nothing is sampled (the policy may be gone) and the target is met
    with serving_nothing(port):
        rc, out, err = run_quietly(main_cli.main, _argv(setup, run_dir, port, "label.target=6", "model.path=/gone"))
    assert rc == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["rankings"] == 6


def test_a_signal_stops_serving_with_exit_4_and_finish_writes_what_is_stored(setup):
    run_dir, port, posted = setup["root"] / "stopped", _free_port(), []
    thread = labelers(port, 3, posted, stop_with=signal.SIGTERM)
    rc, out, err = run_quietly(main_cli.main, _argv(setup, run_dir, port, "label.target=50"))
    thread.join(30)
    assert rc == 4, err[-3000:]
    assert "warning: sampling.max_prompt_tokens=16 cuts the prompts responses are sampled after, " \
           "data.max_prompt_tokens=256 those the reward model trains on; set them equal" in err
    # the random tiny models never end within 4 tokens: 8 prompts x 2 responses x 2 models
    assert "32 of 32 samples ran to sampling.max_new_tokens=4 without ending; they are ranked and trained on as cut " \
           "responses" in err
    assert err.strip().splitlines()[-1] == (
        f"label: stopped with 3/50 rankings stored in {run_dir / 'label.db'}; rerun to continue labeling, or rerun "
        "with label.finish=true to write the dataset from them")
    assert len(Store(run_dir / "label.db").rankings()) == 3
    with serving_nothing(port):  # a task sampled with 2 responses per model is not served as one of 3
        rc, out, err = run_quietly(main_cli.main, _argv(setup, run_dir, port, "label.finish=true", "label.responses=3"))
    assert rc == 2 and "holds a task sampled with other settings (responses_per_model differ)" in err, err[-2000:]
    with serving_nothing(port):
        rc, out, err = run_quietly(main_cli.main, _argv(setup, run_dir, port, "label.target=50", "label.finish=true",
                                                        "model.path=/gone"))
    assert rc == 0, err[-2000:]
    assert "ranking page" not in err and json.loads(out.strip().splitlines()[-1])["rankings"] == 3
    rows = [json.loads(line) for line in (run_dir / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["ended"] == [False] * len(row["responses"]) for row in rows)  # none ended


def test_a_stored_task_is_served_only_with_the_settings_and_models_it_was_sampled_with(setup, tmp_path):
    """A rerun after the policy was trained again (same path, other files) or with more responses per model would
    have people rank samples the run no longer uses; a policy no longer there leaves the task as it is."""
    import shutil

    from rlhf_jax.config import load_config
    from rlhf_jax.errors import UserError
    from rlhf_jax.stages.label import check_task, task_settings

    policy = shutil.copytree(setup["policy"], tmp_path / "policy")
    argv = [a for a in _argv(setup, tmp_path / "run", 0) if not a.startswith("model.path=")]
    cfg = load_config(None, [*argv, f"model.path={policy}"])
    store.create(tmp_path / "label.db", [("p", False, [("a", [], True), ("b", [], True)])], task_settings(cfg))
    task = Store(tmp_path / "label.db")
    check_task(cfg, task)
    check_task(load_config(None, [*argv, "model.path=/gone"]), task)
    with pytest.raises(UserError, match=r"holds a task sampled with other settings \(responses_per_model differ\)"):
        check_task(load_config(None, [*argv, f"model.path={policy}", "label.responses=3"]), task)
    # more prompts, or samples drawn otherwise, make another task too
    with pytest.raises(UserError, match=r"other settings \(label.prompts, sampling differ\)"):
        check_task(load_config(None, [*argv, f"model.path={policy}", f"label.prompts={cfg.label.prompts + 1}",
                                      f"sampling.temperature={cfg.sampling.temperature / 2}"]), task)
    check_task(load_config(None, [*argv, f"model.path={policy}", f"sampling.batch_size={2 * cfg.sampling.batch_size}"]),
               task)
    (policy / "config.json").write_text((policy / "config.json").read_text() + " ")  # trained again, in effect
    with pytest.raises(UserError, match=rf"^label: {tmp_path / 'label.db'} holds a task sampled with other settings "
                                        r"\(the models' files differ\); rerun with those, or delete it"):
        check_task(cfg, task)
    task.close()


def test_a_reward_model_among_the_policies_is_refused_before_any_sampling(setup, tmp_path, monkeypatch):
    """Every model's kind is read from its metadata first: model.path's samples would otherwise be drawn (minutes
    at real size) before label.policies' reward model is refused."""
    from test_run_models import _scalar_export

    from rlhf_jax.stages import label as label_stage

    def sampled(*args, **kwargs):
        raise AssertionError("sampling began before every model's kind was checked")

    monkeypatch.setattr(label_stage, "Generator", sampled)
    rm = _scalar_export(setup["policy"], tmp_path / "rm", "reward")
    rc, _, err = run_quietly(main_cli.main, _argv(setup, tmp_path / "run", _free_port(), f"label.policies=[{rm}]"))
    assert rc == 2 and err.strip().splitlines()[-1] == (f"error: label.policies: {rm}: a reward/value model (scalar "
                                                        "head), expected a policy"), err[-2000:]


def test_a_run_without_rankings_to_finish_and_a_public_host_without_token_are_one_line(setup, tmp_path):
    port = _free_port()
    with serving_nothing(port):
        rc, _, err = run_quietly(main_cli.main, _argv(setup, tmp_path / "run", port, "label.host=0.0.0.0"))
    assert rc == 2 and err.strip() == ("error: label.host=0.0.0.0: other machines can reach it; set label.token too "
                                       "(every request must then carry it)")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    store.create(tmp_path / "run" / "label.db", [("p", False, [("a", [], True), ("b", [], True)])], {})
    with serving_nothing(port):
        rc, _, err = run_quietly(main_cli.main, _argv(setup, tmp_path / "run", port, "label.finish=true"))
    assert rc == 2 and err.strip() == (f"error: {tmp_path / 'run' / 'label.db'}: no rankings stored yet, so there is "
                                       "no dataset to write; rerun without label.finish to serve the ranking page")
    assert (tmp_path / "run" / "label.db").exists()


def test_the_task_keeps_prompts_with_two_distinct_responses_shown_in_a_seeded_shuffle(tmp_path):
    """A prompt whose samples are all one text, or all empty but one, cannot be ranked (one level states no
    preference) and is left out, counted; each kept prompt's responses are shown in an order of the seed, not
    model.path's first (a position people would learn)."""
    from rlhf_jax.config import load_config
    from rlhf_jax.stages.label import Sample, _store_task

    models = [{"policy": f"m{j}", "step": None} for j in range(4)]
    prompts = [f"p{i}" for i in range(12)]
    samples = [[Sample("same", models[0], True), Sample("same", models[1], True)],
               [Sample("", models[0], True), Sample("only", models[1], True)],
               *[[Sample(f"r{i}.{j}", models[j], True) for j in range(4)] for i in range(2, 12)]]

    def stored(seed: int, name: str) -> Store:
        cfg = load_config(None, ["stage=label", "data.name=prompts", f"seed={seed}"])
        _store_task(cfg, tmp_path / name, prompts, {"p3"}, samples)
        return Store(tmp_path / name)

    task = stored(0, "a.db")
    assert sorted(p.text for p in task.prompts.values()) == sorted(prompts[2:])
    assert [p.text for p in task.prompts.values()] != prompts[2:]  # in the seed's order, not the dataset's
    assert task.meta["dropped_prompts"] == 2 and task.meta["empty_responses_dropped"] == 1
    assert [p.text for p in task.prompts.values() if p.held_out] == ["p3"]
    shown = {p.text: [r.text for r in p.responses] for p in task.prompts.values()}
    assert all(sorted(texts) == [f"r{t[1:]}.{j}" for j in range(4)] for t, texts in shown.items())
    firsts = [texts[0].split(".")[1] for texts in shown.values()]
    assert len(set(firsts)) > 1, firsts  # model.path's response is not always shown first
    again = stored(0, "b.db")
    assert {p.text: [r.text for r in p.responses] for p in again.prompts.values()} == shown
    assert [p.text for p in again.prompts.values()] == [p.text for p in task.prompts.values()]
    other = stored(1, "c.db")
    assert {p.text: [r.text for r in p.responses] for p in other.prompts.values()} != shown


def test_identical_responses_merge_their_sources_and_empty_ones_are_dropped():
    a, b = {"policy": "a", "step": 1}, {"policy": "b", "step": None}
    samples = [(" x", a, False), ("", a, True), (" y", a, False), (" x", b, True), (" x", a, False), ("  ", b, True)]
    assert merge_responses([Sample(*s) for s in samples]) == ([(" x", [a, b], True), (" y", [a], False)], 2)


def test_a_sources_step_is_its_runs_last_step_for_an_export(tmp_path):
    from rlhf_jax.stages.label import source_step

    (tmp_path / "sft" / "export").mkdir(parents=True)
    (tmp_path / "sft" / "best").mkdir()
    (tmp_path / "sft" / "summary.json").write_text(json.dumps({"stage": "sft", "steps": 30}))
    assert source_step(str(tmp_path / "sft" / "export")) == 30
    assert source_step(str(tmp_path / "sft" / "best")) is None  # the step of the lowest eval loss: not recorded
    assert source_step(str(tmp_path / "elsewhere" / "export")) is None


def test_the_evaluation_report_shows_how_often_labelers_agree(tmp_path):
    from rlhf_jax.eval.report import markdown_report

    report = {"reference": {"path": "sft"}, "policies": [{"name": "ppo", "win_rate": 0.6, "win_rate_ci": (0.5, 0.7),
                                                         "kl": 1.0, "score_mean": 0.1}],
              "prompts": 10, "seed": 0, "rm_accuracy": 0.7, "labeler_agreement": 0.731}
    assert "Labelers agree on 0.731 of the response pairs they both ranked" in markdown_report(report, [])
    del report["labeler_agreement"]
    assert "Labelers agree" not in markdown_report(report, [])
