"""One run directory and what keeps it sound: resuming from the newest checkpoint that restores (refusing one of
another config or of other models), saving only finite states, stopping on divergence, and stopping cleanly on
SIGTERM / SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import jax

from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.data.prepare import dataset_dir
from rlhf_jax.errors import DivergedError, Interrupted, UserError, memory_error_in
from rlhf_jax.models.checkpoint import TrainCheckpoints, model_fingerprint, read_failure, state_shapes
from rlhf_jax.models.tiny import resolve_model_path
from rlhf_jax.runtime import distributed, fsio
from rlhf_jax.runtime.metrics import MetricsWriter
from rlhf_jax.training import resume
from rlhf_jax.training.state import all_finite


class Run:
    """One run directory: Orbax checkpoints with the loop facts saved beside them, metrics (JSONL +
    TensorBoard) and the resolved config.json, which is written only once resuming is known to be sound.
    The loop facts record a fingerprint of every model the run reads (model.path, the start model and PPO's
    KL reference, and the `models` a stage names, such as ppo.reward_model) and of its dataset (data.name), so
    that a resumed run refuses a model or dataset replaced at the same path."""

    def __init__(self, cfg: Config, run_dir: Path, stage: str, models: dict[str, str] | None = None):
        self.cfg, self.run_dir, self.stage = cfg, run_dir, stage
        refuse_another_stages_run(run_dir, stage)
        self.ckpts = TrainCheckpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.save_every)
        paths = {"model.path": resolve_model_path(cfg.model.path, run_dir, cfg.seed),
                 "data.name": dataset_dir(cfg.data.dir, cfg.data.name), **(models or {})}
        self.models = {key: {"path": str(Path(path).resolve()), "fingerprint": model_fingerprint(path)}
                       for key, path in paths.items()}
        self.facts: dict = {"seed": cfg.seed, "models": self.models}  # small JSON facts (e.g. the best eval loss)
        self.writer: MetricsWriter | None = None

    def resume(self, state, data_iter, total: int, adjust: Callable | None = None):
        """(state, first step to run): the newest checkpoint that restores, or step 0 for a new run.

        A checkpoint from another config or of other models, or past the `total` steps this config trains, is
        refused before anything is written;
        an unrestorable step (half-written, truncated, an item missing) is skipped with a warning, and set aside
        once an older one restores; if none restores the run stops, naming the directory. `adjust(restored
        state, the checkpoint's config) -> (state, note)` applies changed settings that live in the state; its
        note joins the warning that lists the changes."""
        config = config_to_dict(self.cfg)
        start, unreadable, changes = 0, [], ""
        for step in self.ckpts.steps():
            error: Exception | None = None
            try:
                stored_config, stored_shapes, stored_facts = self.ckpts.stored(step)
            except Exception as e:  # noqa: BLE001 - any failure to read a step means the step is unusable
                if memory_error_in(e) is not None:  # but memory is this machine's: the step may be sound
                    raise memory_error_in(e) from None
                error = e
            if error is None:
                allowed = self._check_compatible(step, stored_config or {}, stored_shapes, stored_facts, state)
                try:
                    restored, data_state, facts = self.ckpts.restore(step, state)
                    data_state = self._own_data_state(data_state)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001
                    if memory_error_in(e) is not None:
                        raise memory_error_in(e) from None
                    error = e
            # with several processes all fall back together: a step one of them cannot read is unusable for all
            if distributed.any_process(error is not None):
                unreadable.append((step, error or RuntimeError("another process cannot restore it")))
                continue
            state, note = adjust(restored, stored_config or {}) if adjust is not None else (restored, "")
            data_iter.set_state(data_state)
            start, self.facts = step, {**facts, "models": self.models}
            changes = "; ".join(filter(None, [", ".join(allowed), note]))
            break
        for step, error in unreadable:
            print(f"warning: checkpoint step {step} in {self.ckpts.directory} cannot be restored "
                  f"({_first_line(read_failure(error))}); falling back to an older step", file=sys.stderr)
        if unreadable and not start:
            raise UserError(f"{self.ckpts.directory}: no checkpoint can be restored (newest: step "
                            f"{unreadable[0][0]}); move the directory away to start over")
        if start > total:  # the exports would be of the checkpoint's step, the summary of step `total`
            duration = "train.steps" if self.cfg.train.steps else "train.epochs"
            raise UserError(f"{self.run_dir}: its checkpoint is at step {start}, past the {total} steps this config "
                            f"trains ({duration}); raise {duration}, or use a new run_dir")
        if changes:  # after the refusals: a refused resume is one line
            print(f"warning: resuming with changed settings: {changes}", file=sys.stderr)
        for step, _ in unreadable:  # the run will save these steps again
            kept = self.ckpts.set_aside(step, self.run_dir / "unrestorable_checkpoints")
            print(f"warning: moved step {step} to {kept}", file=sys.stderr)
        if start:
            print(f"resumed from {self.ckpts.directory} at step {start}", file=sys.stderr)
        if distributed.is_primary():
            fsio.write_json_atomically(self.run_dir / "config.json", config)
        self.writer = MetricsWriter(self.run_dir, self.stage, resume_step=start)
        return state, start

    def _check_compatible(self, step: int, stored_config: dict, stored_shapes, stored_facts: dict,
                          state) -> list[str]:
        """Refuses a checkpoint of another run or of other models (UserError naming the keys); returns the
        allowed changes."""
        changed, same = resume.model_changes(stored_facts.get("models") or {}, self.models)
        if changed:
            raise UserError(f"cannot resume {self.ckpts.directory} (step {step}): {', '.join(changed)}: not the "
                            "model or dataset the run started from (its files changed since); restore it or use a "
                            "new run_dir")
        refused, allowed = resume.config_changes(stored_config, config_to_dict(self.cfg), same,
                                                 config_to_dict(Config()))
        shapes = resume.shape_changes(stored_shapes, state_shapes(state))
        if refused or shapes:
            raise UserError(f"cannot resume {self.ckpts.directory} (step {step}) with this config: "
                            f"{', '.join(refused + shapes)}; use the checkpoint's values or a new run_dir")
        return allowed

    def save(self, step: int, state, data_iter) -> None:
        """Checkpoint `step`, after checking that every parameter is finite (nothing non-finite is saved). The
        data item holds every process's iterator state (each reads its own share of the batches)."""
        require_finite(state, step, self)
        data = {"process_count": jax.process_count(), "states": distributed.all_gather_json(data_iter.get_state())}
        self.ckpts.save(step, state, data, self.facts, config_to_dict(self.cfg))

    def _own_data_state(self, stored: dict) -> dict:
        """This process's iterator state from a checkpoint saved by any number of processes. Unpacked data is at
        the same position in every process's share, and that position holds for any process count (each global
        batch is the same rows however it is split); packed data is not, so it resumes only with the same count."""
        states = stored["states"] if "states" in stored else [stored]  # older checkpoints: one process's
        if len(states) == jax.process_count():
            return states[jax.process_index()]
        if self.cfg.data.pack or any(s != states[0] for s in states):
            raise UserError(f"{self.ckpts.directory}: saved by {len(states)} processes with packed data "
                            f"(data.pack), whose positions do not carry over to {jax.process_count()}; resume it "
                            f"with {len(states)} processes")
        return states[0]

    def last_good(self) -> str:
        step = self.ckpts.latest_step()
        return f"the last checkpoint is step {step} in {self.ckpts.directory}" if step else "no checkpoint was saved"

    def close(self) -> None:
        try:
            self.ckpts.close()
        finally:
            if self.writer is not None:
                self.writer.close()


def write_summary(run_dir: Path, stage: str, steps: int, exports: dict, last: dict, extra: dict | None = None) -> dict:
    """The run's summary.json (process 0, written whole) and stdout: the stage, its steps, its exports, its last
    finite metrics (as floats: a count logged live and the same count read back from metrics.jsonl agree, so a
    pipeline step re-entered after its end reports what it did) and `extra`."""
    finite = {k: float(f"{float(v):.7g}") for k, v in last.items()  # 7 digits: a learning rate of 1.7e-7 too
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    summary = {"stage": stage, "steps": steps, **exports, **finite, **(extra or {})}
    if distributed.is_primary():
        fsio.write_json_atomically(run_dir / "summary.json", summary)
    print(json.dumps(summary))
    return summary


def require_finite(state, step: int, run: "Run | None" = None) -> None:
    """Stops the run (DivergedError, exit 3) if any float in the state (params, optimizer moments) is NaN or
    infinite."""
    if not bool(all_finite(state)):
        where = f"; {run.last_good()}" if run is not None else ""
        raise DivergedError(f"diverged at step {step}: the parameters hold non-finite values; nothing was "
                            f"saved or exported{where}")


class SecondSignal(KeyboardInterrupt):
    """Raised by the second SIGTERM/SIGINT: it passes every `except Exception` on its way out, and StopSignals
    turns it into a one-line Interrupted."""


class StopSignals:
    """SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to finish its step, save and stop, instead of
    killing the process; a second signal stops at once, with exit 4 too (a save under way is finished first), and
    a rerun resumes from the last complete checkpoint; a third one kills the process. With several processes
    every one must save the same step: they agree whether any of them was signalled every train.log_every steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._holding, self._held = False, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            return
        for s in self.SIGNALS:  # a third signal kills the process; the handlers before ours come back at exit
            signal.signal(s, signal.SIG_DFL)
        if self._holding:
            self._held = True
            return
        raise SecondSignal

    @contextlib.contextmanager
    def holding_second(self):
        """A second signal waits for the end of the block: an Orbax save abandoned halfway leaves a thread
        waiting for the rest, and the process could not exit."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._held:
            raise SecondSignal

    def stop_now(self, agree: bool) -> bool:
        """Whether to save the step just run and stop. Every process must answer the same: with several, they agree
        through a collective only on the steps where `agree` is true (the loop passes its log and save steps, so
        there is no collective on every step); one process alone stops after the step it was signalled in."""
        if not distributed.is_multiprocess():
            return self.received is not None
        return agree and distributed.any_process(self.received is not None)

    def __exit__(self, exc_type, exc, tb):
        self._restore()
        if isinstance(exc, SecondSignal):
            raise Interrupted("interrupted again: stopped at once; rerun the same command to resume from the last "
                              "complete checkpoint") from None

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = text.strip().splitlines()
    line = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def refuse_another_stages_run(run_dir: Path, stage: str, key: str = "run_dir") -> None:
    """A stage that writes its config.json and metrics into `run_dir` never takes over the run of another stage
    there (its config, its curves: TensorBoard drops every tag's later points at a new attempt)."""
    try:
        other = json.loads((run_dir / "config.json").read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none there, or not a run's
    if other != stage:
        raise UserError(f"{key}={run_dir}: holds a run of stage {other!r}; give the {stage} stage a directory of "
                        "its own")


def logged_at(run: Run, step: int) -> dict:
    """What `run` logged at `step` in metrics.jsonl (the training and the eval lines together)."""
    logged: dict = {}
    path = run.run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if row.get("stage") == run.stage and row.get("step") == step:
            logged.update({k: v for k, v in row.items() if k not in ("stage", "step", "time")})
    return logged
