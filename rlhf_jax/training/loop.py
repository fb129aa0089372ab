"""The training loop every stage writes out in its own words, with this module's bookkeeping:

    with TrainingLoop(run, start, total, "sft", has_eval=True) as loop:
        for step in loop:                                     # 1-based: the step about to run
            batch = next(data_iter)
            state, metrics = train_step(state, to_global(batch, mesh), loop.rng(step))
            loop.log(step, metrics, items=real_tokens(batch), truncated=batch["truncated"].sum())
            if loop.eval_due(step):
                loop.log_eval(step, evaluate(state))
            loop.save_when_due(step, state, data_iter)
    loop.last                                                 # the last logged metrics, eval included

The host never waits for a step it has just dispatched: the metrics of a log step are fetched after the next step
is dispatched (or before an evaluation or a save, which wait anyway), checked for divergence and written then.
Saves happen on the cadence, at the last step, and when SIGTERM / SIGINT asked to stop (the loop then raises
Interrupted, exit 4, once the step is saved). A non-finite loss, gradient norm or parameter stops the run
(DivergedError, exit 3) before anything is saved.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.errors import DivergedError, Interrupted
from rlhf_jax.runtime import distributed
from rlhf_jax.runtime.progress import progress
from rlhf_jax.training.run import Run, StopSignals, logged_at

DIVERGENCE_KEYS = ("loss", "grad_norm", "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "kl",
                   "score_mean")


class Cadence:
    """When to log, evaluate and save, from the train section; the last step always does all three."""

    def __init__(self, cfg: Config, total: int, has_eval: bool):
        self.t, self.total, self.has_eval = cfg.train, total, has_eval

    def log(self, step: int) -> bool:
        return step % self.t.log_every == 0 or step == self.total

    def eval(self, step: int) -> bool:
        return self.has_eval and ((self.t.eval_every and step % self.t.eval_every == 0) or step == self.total)

    def save(self, step: int) -> bool:
        return bool(self.t.save_every and step % self.t.save_every == 0) or step == self.total


class TrainingLoop:
    """Steps start+1..total of `run`: progress, the log / eval / save cadence, throughput (`rate_name`: the
    `items` a step processes per second, over the steps since the last log, evaluation, saving and the first
    step of a start or resume (its compilation) excluded: a log step that is that first step has no rate),
    the running count of truncated examples, divergence and stop signals."""

    def __init__(self, run: Run, start: int, total: int, desc: str, has_eval: bool = False,
                 rate_name: str = "tokens_per_s"):
        self.run, self.start, self.total, self.rate_name = run, start, total, rate_name
        self.cadence = Cadence(run.cfg, total, has_eval)
        self.key = jax.random.key(run.cfg.seed)
        self.bar = progress(total, desc, "step", initial=start, enabled=distributed.is_primary())
        self.signals = StopSignals()
        # a finished run, run again, reports what it logged at its end
        self.last: dict = {} if start < total else logged_at(run, total)
        self._pending: tuple | None = None  # (step, device metrics, items and seconds of its window) not fetched
        # the count of cut examples goes on from the checkpoint's: a resumed run logs what a straight one does
        self._items, self._stopping = 0, False
        self._truncated = int(run.facts.get("truncated_examples", 0)) if start > 0 else 0
        # this process's items and cut examples since they were last added up over the processes (each process
        # sees its own rows of a batch)
        self._items_here, self._truncated_here = 0, 0
        # the window of a log line: from the last log step's dispatch to this one's, less evaluations and saves
        self._window_start, self._paused_s, self._pause_start = time.perf_counter(), 0.0, 0.0

    def __enter__(self):
        self.bar.__enter__()  # the bar ends its line before any error is printed
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.signals.__exit__(*exc)
        finally:
            self.bar.__exit__(*exc)

    def __iter__(self):
        for step in range(self.start + 1, self.total + 1):
            yield step
            self.bar.update(1)
            if self._stopping:
                self.run.ckpts.wait()
                raise Interrupted(f"interrupted at step {step}; saved; rerun the same command to resume")
        self._flush()

    def rng(self, step: int) -> jax.Array:
        """The step's random key (dropout): the same for a step however the run was interrupted and resumed."""
        return jax.random.fold_in(self.key, step - 1)

    def log(self, step: int, metrics: dict, items: int, truncated: int) -> None:
        """Records the step just dispatched; on a log step its metrics are kept on the device until the next
        step is dispatched. The previous log step's metrics are fetched, checked and written now."""
        self._flush()
        # the first step of a start or resume compiled in its call: its time and items are not training's
        first, logs = step == self.start + 1, self.cadence.log(step)
        if first and not logs:
            self._window_start = time.perf_counter()  # the window opens once it is dispatched
        else:
            self._items_here += int(items)
        self._truncated_here += int(truncated)
        if logs:
            self._add_up()
            now = time.perf_counter()
            seconds = None if first else now - self._window_start - self._paused_s  # None: no rate to tell
            self._pending = (step, metrics, self._items, seconds)
            self._window_start, self._paused_s = now, 0.0
            self._items = 0

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after `step`; when so the log is brought up to date first (so that evaluating is
        not timed as training, and its lines follow the step's)."""
        due = self.cadence.eval(step)
        if due:
            self._flush()
            self._pause_start = time.perf_counter()
        return due

    def log_eval(self, step: int, metrics: dict) -> None:
        eval_metrics = {f"eval_{k}": v for k, v in metrics.items()}
        if eval_metrics:
            self.run.writer.write(step, eval_metrics)
            self.last.update(eval_metrics)
        self._paused_s += time.perf_counter() - self._pause_start  # not training time

    def save_when_due(self, step: int, state, data_iter) -> None:
        """Saves `state` (and the data position) on the cadence, at the last step, or when a stop was asked; after
        a stop the loop ends with Interrupted. Every process takes the same decision at the same step."""
        self._stopping = self.signals.stop_now(agree=self.cadence.log(step) or self.cadence.save(step))
        if not (self.cadence.save(step) or self._stopping):
            return
        self._flush()
        self._add_up()
        self.run.facts["truncated_examples"] = self._truncated
        start = time.perf_counter()
        with self.signals.holding_second():
            self.run.save(step, state, data_iter)
        self._paused_s += time.perf_counter() - start  # not training time

    def _add_up(self) -> None:
        """Adds every process's items and cut examples since the last call to the totals (a collective: every
        process calls it at the same step, a log or a save step)."""
        items, truncated = distributed.sum_over_processes(np.asarray([self._items_here, self._truncated_here]))
        self._items += int(items)
        self._truncated += int(truncated)
        self._items_here, self._truncated_here = 0, 0

    def _flush(self) -> None:
        """Fetches, checks and writes the pending log step's metrics."""
        if self._pending is None:
            return
        step, metrics, items, seconds = self._pending
        self._pending = None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_metrics(metrics, step, self.run)
        if seconds is not None:
            metrics[self.rate_name] = items / max(seconds, 1e-9)
        metrics["truncated_examples"] = self._truncated  # over-length examples cut so far (resumes included)
        self.run.writer.write(step, metrics)
        rate = {"rate": f"{metrics[self.rate_name]:.0f}"} if self.rate_name in metrics else {}
        # fetched a step late: the bar's position is past the step the values are of, which the line names
        values = {k: f"{metrics[k]:.4f}" for k in ("loss", "score_mean", "kl") if k in metrics}
        self.bar.set_postfix({"at_step": step, **values}, **rate)
        self.last = metrics


def check_metrics(metrics: dict, step: int, run: Run) -> None:
    """Stops the run (DivergedError, exit 3) on a non-finite loss or gradient norm."""
    bad = {k: metrics[k] for k in DIVERGENCE_KEYS if k in metrics and not math.isfinite(metrics[k])}
    if bad:
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergedError(f"diverged at step {step}: {values}; nothing non-finite was saved or exported; "
                            f"{run.last_good()} (try a lower optim.lr)")
