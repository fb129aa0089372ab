"""What every training stage shares: the model to train and its sharded state, the step count (steps or
epochs), resuming, the jitted and donated step, the log / eval / checkpoint cadence with progress and
throughput, divergence and signal stops, micro-batched evaluation and the params-only export. Stage modules
compose these pieces (`trainers.py` for sft and rm, `ppo_stage.py` for ppo); none of them copies the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.runtime import distributed, fsio, sharding
from rlhf_jax.training import resume, steps
from rlhf_jax.models.checkpoint import (
    LoadedModel, TrainCheckpoints, load_model, model_fingerprint, save_model, state_shapes)
from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.errors import DivergedError, Interrupted, UserError
from rlhf_jax.models.tiny import resolve_model_path
from rlhf_jax.models.tokenizer import load_tokenizer
from rlhf_jax.models.transformer import Transformer, init_boxed, init_scalar_head, make_model, param_logical_axes
from rlhf_jax.runtime.metrics import MetricsWriter
from rlhf_jax.runtime.progress import progress


# --------------------------------------------------------------------------------------------- the model


def load_for_training(cfg: Config, run_dir: Path, head: str):
    """(loaded checkpoint, tokenizer, model with `head`) of cfg.model.path (the tiny built-in model when empty)."""
    loaded = load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed), need_tokenizer=True)
    model = make_model(loaded.cfg, head, cfg.model.dtype, cfg.model.param_dtype, remat=cfg.model.remat == "block")
    return loaded, load_tokenizer(loaded.tokenizer_dir), model


def with_head(params: dict, cfg, from_head: str, to_head: str, rng: jax.Array) -> dict:
    """A checkpoint's params for a model with `to_head`: a language model becoming a reward or value model
    drops its LM head and gets a fresh scalar head, and nothing else is initialised."""
    if to_head == from_head:
        return dict(params)
    if to_head == "scalar" and from_head == "lm":
        out = {k: v for k, v in params.items() if k != "lm_head"}
        out["score"] = init_scalar_head(cfg, rng)
        return out
    raise UserError(f"cannot train a {to_head!r}-head model from a {from_head!r}-head checkpoint")


def check_positions(model_cfg, length: int, keys: str) -> None:
    """Sequences must fit the model's positions: GPT-2 would read past its position table (NaN), and rotary
    models were never trained there."""
    if length > model_cfg.max_position_embeddings:
        raise UserError(f"{keys} = {length} exceeds the model's {model_cfg.max_position_embeddings} positions")


def report_sharding(model: Transformer, mesh) -> None:
    """Print how the params are split over the mesh (one screen) and warn once per replicated fallback."""
    abstract = jax.eval_shape(lambda: nn.unbox(init_boxed(model, jax.random.key(0))))
    sharding.print_sharding_report(sharding.sharding_report(param_logical_axes(model), abstract, mesh))


def initial_params(loaded: LoadedModel, model: Transformer, seed: int) -> dict:
    """Host params in the model's layout and parameter dtype."""
    params = with_head(loaded.params, loaded.cfg, loaded.head, model.head, jax.random.key(seed))
    return jax.tree.map(lambda x: np.asarray(x).astype(model.param_dtype), params)


def state_shardings(model: Transformer, optimizer, mesh):
    """NamedShardings of the whole TrainState from the params' logical names: optimizer moments inherit them."""
    boxed = jax.eval_shape(lambda: init_boxed(model, jax.random.key(0)))
    abstract = jax.eval_shape(lambda p: steps.init_state(p, optimizer), boxed)
    specs = nn.get_partition_spec(abstract)
    shapes = nn.unbox(abstract)
    return jax.tree.map(lambda spec, x: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        tuple(spec), x.shape, mesh)), specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def place_state(params: dict, optimizer, state_sh):
    """The initial TrainState, built on the mesh (optimizer moments are created sharded, never on one device)."""
    init = jax.jit(lambda p: steps.init_state(p, optimizer), in_shardings=(state_sh.params,), out_shardings=state_sh)
    return init(params)


def jit_step(step: Callable, state_sh, mesh):
    """`step(state, batch, rng) -> (state, metrics)` jitted over the mesh: batches split over the data-parallel
    axes, metrics replicated, and the old state's buffers donated to the new one."""
    repl = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
                   out_shardings=(state_sh, repl), donate_argnums=0)


def to_global(batch: dict, mesh) -> dict:
    """This host's rows -> one global array per key, split over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- sizes


def micro_batch_size(cfg: Config, mesh) -> int:
    """Rows forwarded at once: train.batch_size / optim.grad_accum_steps, checked against the mesh."""
    batch, accum = cfg.train.batch_size, cfg.optim.grad_accum_steps
    if batch % accum:
        raise UserError(f"train.batch_size={batch} is not divisible by optim.grad_accum_steps={accum}")
    sharding.check_batch_size(batch // accum, mesh, "train.batch_size" if accum == 1 else
                              f"train.batch_size / optim.grad_accum_steps ({batch} / {accum})")
    return batch // accum


def eval_batch_size(cfg: Config, mesh) -> int:
    """Rows per evaluation forward: train.eval_batch_size, or the training micro-batch, which is known to fit."""
    size = cfg.train.eval_batch_size or micro_batch_size(cfg, mesh)
    sharding.check_batch_size(size, mesh, "train.eval_batch_size")
    return size


def total_steps(cfg: Config, train_examples: int) -> int:
    """train.steps, or the steps of train.epochs passes over the training split (never past the last epoch)."""
    t = cfg.train
    if t.steps:
        return t.steps
    if not t.epochs:
        raise UserError("set train.steps or train.epochs (passes over the training split)")
    if cfg.data.pack:
        raise UserError("train.epochs cannot be used with data.pack (the packed row count is not known in "
                        "advance); set train.steps")
    return max(1, math.floor(t.epochs * train_examples / t.batch_size))


# --------------------------------------------------------------------------------------------- the run


class Run:
    """One run directory: Orbax checkpoints with the loop facts saved beside them, metrics (JSONL +
    TensorBoard) and the resolved config.json, which is written only once resuming is known to be sound.
    The loop facts record a fingerprint of every model the run reads (model.path, the start model and PPO's
    KL reference, and the `models` a stage names, such as ppo.reward_model), so that a resumed run refuses a
    model replaced at the same path."""

    def __init__(self, cfg: Config, run_dir: Path, stage: str, models: dict[str, str] | None = None):
        self.cfg, self.run_dir, self.stage = cfg, run_dir, stage
        self.ckpts = TrainCheckpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
        paths = {"model.path": resolve_model_path(cfg.model.path, run_dir, cfg.seed), **(models or {})}
        self.models = {key: {"path": str(Path(path).resolve()), "fingerprint": model_fingerprint(path)}
                       for key, path in paths.items()}
        self.facts: dict = {"seed": cfg.seed, "models": self.models}  # small JSON facts (e.g. the best eval loss)
        self.writer: MetricsWriter | None = None

    def resume(self, state, data_iter, adjust: Callable | None = None):
        """(state, first step to run): the newest checkpoint that restores, or step 0 for a new run.

        A checkpoint from another config or of other models is refused before anything is restored or written;
        an unrestorable step (half-written, truncated, an item missing) is skipped with a warning, and set aside
        once an older one restores; if none restores the run stops, naming the directory. `adjust(restored
        state, the checkpoint's config) -> (state, note)` applies changed settings that live in the state; its
        note joins the warning that lists the changes."""
        config = config_to_dict(self.cfg)
        start, unreadable = 0, []
        for step in self.ckpts.steps():
            error: Exception | None = None
            try:
                stored_config, stored_shapes, stored_facts = self.ckpts.stored(step)
            except Exception as e:  # noqa: BLE001 - any failure to read a step means the step is unusable
                error = e
            if error is None:
                allowed = self._check_compatible(step, stored_config or {}, stored_shapes, stored_facts, state)
                try:
                    restored, data_state, facts = self.ckpts.restore(step, state)
                    data_state = self._own_data_state(data_state)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001
                    error = e
            # with several processes all fall back together: a step one of them cannot read is unusable for all
            if distributed.any_process(error is not None):
                unreadable.append((step, error or RuntimeError("another process cannot restore it")))
                continue
            state, note = adjust(restored, stored_config or {}) if adjust is not None else (restored, "")
            data_iter.set_state(data_state)
            start, self.facts = step, {**facts, "models": self.models}
            if allowed or note:
                changes = "; ".join(filter(None, [", ".join(allowed), note]))
                print(f"warning: resuming with changed settings: {changes}", file=sys.stderr)
            break
        for step, error in unreadable:
            print(f"warning: checkpoint step {step} in {self.ckpts.directory} cannot be restored "
                  f"({_first_line(error)}); falling back to an older step", file=sys.stderr)
        if unreadable and not start:
            raise UserError(f"{self.ckpts.directory}: no checkpoint can be restored (newest: step "
                            f"{unreadable[0][0]}); move the directory away to start over")
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
                            "model the run started from (its files changed since); restore that model or use a "
                            "new run_dir")
        refused, allowed = resume.config_changes(stored_config, config_to_dict(self.cfg), same)
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


@jax.jit
def _all_finite(tree) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in floats] or [True]))


def require_finite(state, step: int, run: "Run | None" = None) -> None:
    """Stops the run (DivergedError, exit 3) if any float in the state (params, optimizer moments) is NaN or
    infinite."""
    if not bool(_all_finite(state)):
        where = f"; {run.last_good()}" if run is not None else ""
        raise DivergedError(f"diverged at step {step}: the parameters hold non-finite values; nothing was "
                            f"saved or exported{where}")


DIVERGENCE_KEYS = ("loss", "grad_norm", "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "kl",
                   "score_mean")


def check_metrics(metrics: dict, step: int, run: Run) -> None:
    """Stops the run (DivergedError, exit 3) on a non-finite loss or gradient norm."""
    bad = {k: metrics[k] for k in DIVERGENCE_KEYS if k in metrics and not math.isfinite(metrics[k])}
    if bad:
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergedError(f"diverged at step {step}: {values}; nothing non-finite was saved or exported; "
                            f"{run.last_good()} (try a lower optim.lr)")


class SecondSignal(KeyboardInterrupt):
    """Raised by the second SIGTERM/SIGINT: it passes every `except Exception` on its way out, and StopSignals
    turns it into a one-line Interrupted."""


class StopSignals:
    """SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to finish its step, save and stop, instead of
    killing the process; a second signal stops at once, with exit 4 too (a save under way is finished first), and
    a rerun resumes from the last complete checkpoint; a third one kills the process. With several processes
    every one must save the same step: after each step they agree whether any of them was signalled."""

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
        self._restore()  # a third signal kills the process
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

    def stop_now(self) -> bool:
        """Whether to save the step just run and stop (called after every step, by every process)."""
        return distributed.any_process(self.received is not None)

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


class Cadence:
    """When to log, evaluate and save, from the train section; the last step always does all three."""

    def __init__(self, cfg: Config, total: int, has_eval: bool):
        self.t, self.total, self.has_eval = cfg.train, total, has_eval

    def log(self, done: int) -> bool:
        return done % self.t.log_every == 0 or done == self.total

    def eval(self, done: int) -> bool:
        return self.has_eval and ((self.t.eval_every and done % self.t.eval_every == 0) or done == self.total)

    def save(self, done: int) -> bool:
        return bool(self.t.save_every and done % self.t.save_every == 0) or done == self.total


def _logged(run: Run, step: int) -> dict:
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


def drive(run: Run, state, *, start: int, total: int, data_iter, step_fn, mesh, desc: str,
          count_tokens: Callable[[dict], int], cadence: Cadence, on_eval: Callable | None = None,
          rate_name: str = "tokens_per_s"):
    """Runs steps start..total-1 of `step_fn` on batches of `data_iter` (a resumable iterator): logs metrics
    (with `rate_name`, count_tokens per second, and the running count of truncated examples), calls
    `on_eval(done, state) -> metrics` and saves on the cadence. A non-finite loss, gradient norm or parameter
    stops it (DivergedError) before anything is saved; SIGTERM/SIGINT save the step in hand and stop
    (Interrupted). Returns (state, the last logged metrics, eval metrics included)."""
    rng = jax.random.key(run.cfg.seed)
    bar = progress(total, desc, "step", initial=start, enabled=distributed.is_primary())
    last: dict = {} if start < total else _logged(run, total)  # a finished run, run again, reports its end
    window_start, window_tokens, truncated = time.perf_counter(), 0, 0
    with StopSignals() as signals, bar:  # the bar ends its line before any error is printed
        for step in range(start, total):
            batch = next(data_iter)
            window_tokens += count_tokens(batch)
            truncated += int(batch["truncated"].sum())
            state, metrics = step_fn(state, to_global(batch, mesh), jax.random.fold_in(rng, step))
            done = step + 1
            stop = signals.stop_now()
            save = cadence.save(done) or stop
            if cadence.log(done) or save:  # checked at least every log_every steps and before every save
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_metrics(metrics, done, run)
            if cadence.log(done):
                metrics[rate_name] = window_tokens / (time.perf_counter() - window_start)
                metrics["truncated_examples"] = truncated  # over-length examples cut so far in this run
                run.writer.write(done, metrics)
                bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss", "score_mean", "kl") if k in metrics},
                                rate=f"{metrics[rate_name]:.0f}")
                last = metrics
            if on_eval is not None and cadence.eval(done):
                eval_metrics = {f"eval_{k}": v for k, v in on_eval(done, state).items()}
                if eval_metrics:
                    run.writer.write(done, eval_metrics)
                    last.update(eval_metrics)
            if save:
                with signals.holding_second():
                    run.save(done, state, data_iter)
            bar.update(1)
            if stop:
                run.ckpts.wait()
                raise Interrupted(f"interrupted at step {done}; saved; rerun the same command to resume")
            if cadence.log(done):  # throughput windows exclude evaluation and saving
                window_start, window_tokens = time.perf_counter(), 0
    return state, last


def evaluate(eval_fn, params, batches: Iterator[dict], mesh, limit: int = 0) -> dict:
    """Sums of `eval_fn(params, batch)` over the batches (the first `limit` when > 0), as floats."""
    totals: dict = {}
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        sums = jax.device_get(eval_fn(params, to_global(batch, mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return totals


def export(out_dir: Path, params, loaded: LoadedModel, model: Transformer, extra: dict | None = None,
           role: str | None = None) -> Path:
    """Params-only model checkpoint (Orbax, with tokenizer) for the next stage and for convert --to-hf: float32,
    written shard by shard from the mesh (with several processes, each writes its own shards). Its `role` is
    recorded: by default a language model is a policy and a scalar head a reward model (ppo's value model says
    so)."""
    params = _as_float32(params)
    if not bool(_all_finite(params)):
        raise DivergedError(f"the parameters hold non-finite values; {out_dir} was not written")
    role = role or ("policy" if model.head == "lm" else "reward")
    return save_model(out_dir, params, loaded.cfg, model.head, loaded.tokenizer_dir, overwrite=True,
                      extra={**(extra or {}), "role": role})


@jax.jit
def _as_float32(params):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
