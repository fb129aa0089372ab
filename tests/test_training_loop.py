"""The training loop's bookkeeping on a scripted run: when metrics are fetched, what is written, when it saves,
when the processes agree on a stop signal, and how a signal ends the loop."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest

from rlhf_jax.errors import DivergedError, Interrupted
from rlhf_jax.runtime import distributed
from rlhf_jax.training.loop import TrainingLoop


class Fetched:
    """A metric whose fetch is recorded (the loop turns each fetched value into a float)."""

    def __init__(self, events: list, step: int, value: float = 1.0):
        self.events, self.step, self.value = events, step, value

    def __float__(self) -> float:
        self.events.append(("fetch", self.step))
        return self.value


def _run(tmp_path, events: list, log_every=1, save_every=0, eval_every=0):
    writer = SimpleNamespace(write=lambda step, metrics: events.append(("write", step, tuple(sorted(metrics)))))
    train = SimpleNamespace(log_every=log_every, save_every=save_every, eval_every=eval_every)
    return SimpleNamespace(cfg=SimpleNamespace(seed=0, train=train), run_dir=tmp_path, stage="sft", writer=writer,
                           save=lambda step, state, data: events.append(("save", step)),
                           ckpts=SimpleNamespace(wait=lambda: None), last_good=lambda: "no checkpoint was saved",
                           facts={})


def _drive(run, total: int, events: list, has_eval=False, signal_at: int | None = None, loss=1.0):
    with TrainingLoop(run, 0, total, "sft", has_eval) as loop:
        for step in loop:
            events.append(("dispatch", step))
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            loop.log(step, {"loss": Fetched(events, step, loss)}, items=10, truncated=step == 2)
            if loop.eval_due(step):
                events.append(("eval", step))
                loop.log_eval(step, {"loss": 0.5})
            loop.save_when_due(step, "state", None)
    return loop


def test_a_log_step_is_fetched_after_the_next_step_is_dispatched(tmp_path):
    events: list = []
    loop = _drive(_run(tmp_path, events, log_every=2, save_every=3), 6, events)
    order = [e[:2] for e in events if e[0] != "write"]
    assert order == [("dispatch", 1), ("dispatch", 2), ("dispatch", 3),
                     ("fetch", 2),   # step 2 logged once step 3 runs
                     ("save", 3), ("dispatch", 4), ("dispatch", 5),
                     ("fetch", 4), ("dispatch", 6),
                     ("fetch", 6), ("save", 6)]  # the last step is fetched before it is saved
    writes = [e for e in events if e[0] == "write"]
    assert [w[1] for w in writes] == [2, 4, 6]
    assert writes[0][2] == ("loss", "tokens_per_s", "truncated_examples")
    assert loop.last["truncated_examples"] == 1 and loop.last["loss"] == 1.0


def test_a_progress_line_names_the_step_its_values_are_of(tmp_path, capsys):
    """Metrics are fetched a step late, so a redirected log's line at 30% showed an older log step's values as if
    they were its own."""
    events: list = []
    _drive(_run(tmp_path, events, log_every=5), 20, events)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("(")[0] for line in lines] == [f"sft: {10 * i}% " for i in range(1, 11)]
    assert lines[2].startswith("sft: 30% (6/20 step") and "at_step=5 loss=1.0000" in lines[2], lines
    assert "at_step" not in lines[1] and "at_step=20 " in lines[-1], lines  # none fetched by step 4; the last, saved


def test_the_last_step_is_logged_evaluated_and_saved_off_the_cadence(tmp_path):
    events: list = []
    loop = _drive(_run(tmp_path, events, log_every=5, save_every=4, eval_every=3), 7, events, has_eval=True)
    assert [e[1] for e in events if e[0] == "fetch"] == [5, 7]
    assert [e[1] for e in events if e[0] == "eval"] == [3, 6, 7]
    assert [e[1] for e in events if e[0] == "save"] == [4, 7]
    assert loop.last["loss"] == 1.0 and loop.last["eval_loss"] == 0.5


def test_the_count_of_cut_examples_is_saved_and_goes_on_after_a_resume(tmp_path):
    events: list = []
    run = _run(tmp_path, events, log_every=1, save_every=3)
    _drive(run, 3, events)  # step 2 cut one example
    assert run.facts["truncated_examples"] == 1  # saved with step 3's checkpoint
    events.clear()
    with TrainingLoop(run, 3, 5, "sft") as loop:  # resumed from step 3
        for step in loop:
            loop.log(step, {"loss": Fetched(events, step, 1.0)}, items=10, truncated=1)
            loop.save_when_due(step, "state", None)
    assert loop.last["truncated_examples"] == 3 and run.facts["truncated_examples"] == 3


def test_evaluation_follows_its_steps_log_line(tmp_path):
    events: list = []
    loop = _drive(_run(tmp_path, events, log_every=1, eval_every=2), 3, events, has_eval=True)
    assert [e[:2] for e in events if e[0] in ("fetch", "eval", "write")] == [
        ("fetch", 1), ("write", 1), ("fetch", 2), ("write", 2), ("eval", 2), ("write", 2),
        ("fetch", 3), ("write", 3), ("eval", 3), ("write", 3)]
    assert loop.last["eval_loss"] == 0.5


def test_a_non_finite_loss_stops_before_the_step_is_saved(tmp_path):
    events: list = []
    with pytest.raises(DivergedError, match="diverged at step 1: loss=nan"):
        _drive(_run(tmp_path, events, save_every=1), 3, events, loss=float("nan"))
    assert not [e for e in events if e[0] in ("save", "write")]


def test_a_signal_saves_the_step_in_hand_and_stops(tmp_path):
    events: list = []
    with pytest.raises(Interrupted, match="interrupted at step 3; saved"):
        _drive(_run(tmp_path, events, log_every=2), 8, events, signal_at=3)
    assert [e for e in events if e[0] == "save"] == [("save", 3)]
    assert ("dispatch", 4) not in events


def test_several_processes_agree_on_a_stop_only_on_log_and_save_steps(tmp_path, monkeypatch):
    asked: list = []
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(distributed, "any_process", lambda flag: asked.append(flag) or flag)
    events: list = []
    with pytest.raises(Interrupted, match="interrupted at step 6; saved"):
        _drive(_run(tmp_path, events, log_every=2, save_every=3), 9, events, signal_at=5)
    assert asked == [False, False, False, True]  # steps 2 (log), 3 (save), 4 (log), 6 (both; signalled in 5)
    assert [e for e in events if e[0] == "save"] == [("save", 3), ("save", 6)]


def _events(path) -> list:
    """The events of a file on disk (TFRecord framing: length, its CRC, the Event, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, i, out = path.read_bytes(), 0, []
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def _tensorboard_steps(run_dir) -> list[int]:
    """The step of every scalar on disk, in the order written."""
    return [e.step for p in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")) for e in _events(p)
            for _ in e.summary.value]


def test_every_logged_step_is_in_the_tensorboard_file_at_once_and_a_resume_purges_the_rest(tmp_path):
    """As metrics.jsonl: tensorboardX's SummaryWriter held up to two minutes of events in a queue, and a run killed
    after a checkpoint and resumed from it rewrites only the steps after it, so a step held then was lost."""
    from tensorboardX.proto.event_pb2 import SessionLog

    from rlhf_jax.runtime.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, "sft")
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "lr": 0.1})
    assert _tensorboard_steps(tmp_path) == [1, 1, 2, 2, 3, 3]  # before any close: what a kill leaves
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resumed = MetricsWriter(tmp_path, "sft", resume_step=2)  # the attempt's step 3 is hidden from here on
    resumed.write(3, {"loss": 0.25})
    assert _tensorboard_steps(tmp_path) == [1, 1, 2, 2, 3, 3, 3]
    events = [e for p in sorted((tmp_path / "tensorboard").glob("events.*")) for e in _events(p)]
    assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [(3, SessionLog.START)]
    writer.close()
    resumed.close()


def test_a_rerun_from_step_minus_1_replaces_every_line_of_its_stage(tmp_path):
    """The evaluator logs a model given as a directory at step 0: its rerun must not log it twice."""
    from tensorboardX.proto.event_pb2 import SessionLog

    from rlhf_jax.runtime.metrics import MetricsWriter

    with MetricsWriter(tmp_path, "sft") as writer:
        writer.write(1, {"loss": 1.0})
    for kl in (0.5, 0.25):
        with MetricsWriter(tmp_path, "eval", resume_step=-1) as writer:
            writer.write(0, {"kl": kl}, policy="sft/export")
            writer.write(5, {"kl": kl}, policy="ppo")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"], x.get("kl")) for x in lines] == [("sft", 1, None), ("eval", 0, 0.25),
                                                                     ("eval", 5, 0.25)]
    events = [e for p in sorted((tmp_path / "tensorboard").glob("events.*")) for e in _events(p)]
    assert [e.step for e in events if e.HasField("session_log") and e.session_log.status == SessionLog.START] == [0, 0]


def test_a_metrics_line_is_strict_json_whatever_the_values(tmp_path):
    """A perplexity that overflowed (the loss still finite) or a NaN held-out metric: null in the line (JSON has
    no NaN or Infinity), the value itself in TensorBoard; several policies of one stage are named."""
    import math

    from rlhf_jax.runtime.metrics import MetricsWriter

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    with MetricsWriter(tmp_path, "eval") as writer:
        writer.write(1, {"loss": 90.0, "perplexity": math.inf, "eval_loss": math.nan})
        writer.write(2, {"kl": 0.5}, policy="ppo/export")
    first, second = (json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").open())
    assert (first["loss"], first["perplexity"], first["eval_loss"]) == (90.0, None, None)
    assert second["policy"] == "ppo/export" and second["kl"] == 0.5
    tags = {v.tag: v.simple_value for p in (tmp_path / "tensorboard").glob("events.*") for e in _events(p)
            for v in e.summary.value}
    assert math.isinf(tags["eval/perplexity"]) and math.isnan(tags["eval/eval_loss"])
    assert tags["eval/ppo/export/kl"] == 0.5


@pytest.mark.parametrize("save_every, eval_every", [(0, 0), (3, 0), (0, 3), (3, 5)])
def test_the_rate_counts_training_time_only_however_saves_and_evaluations_fall(tmp_path, monkeypatch, save_every,
                                                                              eval_every):
    """10 items per step of 1 s on a fake clock, saves and evaluations of 100 s between log steps (every 4): the
    rate is 10/s. Resetting the window at a save or evaluation dropped the time of the steps before it (20/s)."""
    import rlhf_jax.training.loop as loop_module

    clock = [0.0]
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: clock[0])
    rates = []
    run = _run(tmp_path, [], log_every=4, save_every=save_every, eval_every=eval_every)
    run.writer = SimpleNamespace(write=lambda step, metrics: rates.append(metrics.get("tokens_per_s")))
    run.save = lambda *args: clock.__setitem__(0, clock[0] + 100)
    with TrainingLoop(run, 0, 16, "sft", has_eval=bool(eval_every)) as loop:
        for step in loop:
            clock[0] += 1.0 + 300.0 * (step == 1)  # the first step compiles
            loop.log(step, {"loss": 1.0}, items=10, truncated=0)
            if loop.eval_due(step):
                clock[0] += 100
                loop.log_eval(step, {})
            loop.save_when_due(step, "state", None)
    assert [r for r in rates if r is not None] == pytest.approx([10.0] * 4), rates


def test_a_first_step_that_is_a_log_step_has_no_rate(tmp_path, monkeypatch):
    """Its window is its compilation: no rate in that line; the next lines have theirs."""
    import rlhf_jax.training.loop as loop_module

    clock = [0.0]
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: clock[0])
    lines = []
    run = _run(tmp_path, [], log_every=1, save_every=0, eval_every=0)
    run.writer = SimpleNamespace(write=lambda step, metrics: lines.append(metrics))
    run.save = lambda *args: None
    with TrainingLoop(run, 0, 3, "sft") as loop:
        for step in loop:
            clock[0] += 1.0 + 300.0 * (step == 1)
            loop.log(step, {"loss": 1.0}, items=10, truncated=0)
            loop.save_when_due(step, "state", None)
    assert "tokens_per_s" not in lines[0] and [m["tokens_per_s"] for m in lines[1:]] == pytest.approx([10.0, 10.0])


def test_a_resume_drops_only_the_lines_after_its_checkpoint_of_its_own_stage(tmp_path):
    """Resumed from step 2: the lines of steps 1 and 2 stay (they are not written again), step 3's go, another
    stage's and a line cut off by a kill are not the stage's to keep or drop (the cut one goes)."""
    from rlhf_jax.runtime.metrics import drop_lines_after

    path = tmp_path / "metrics.jsonl"
    rows = [{"stage": "sft", "step": 1}, {"stage": "sft", "step": 2}, {"stage": "eval", "step": 3},
            {"stage": "sft", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "sft", "st')
    drop_lines_after(path, 2, "sft")
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    drop_lines_after(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:2]


def test_the_summary_keeps_seven_significant_digits_of_every_metric(tmp_path, capsys):
    """Rounded to decimal places, DPO's learning rate of 1.7e-7 read 0.0 in summary.json and on stdout."""
    from rlhf_jax.training.run import write_summary

    summary = write_summary(tmp_path, "dpo", 3, {}, {"lr": 1.6666667e-07, "loss": 0.69314718, "pairs": 48,
                                                     "kl": float("nan")})
    assert summary == {"stage": "dpo", "steps": 3, "lr": 1.666667e-07, "loss": 0.6931472, "pairs": 48.0}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary == json.loads(capsys.readouterr().out)
