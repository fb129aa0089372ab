"""The training loop's bookkeeping on a scripted run: when metrics are fetched, what is written, when it saves,
when the processes agree on a stop signal, and how a signal ends the loop."""

from __future__ import annotations

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
