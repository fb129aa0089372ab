"""What every training stage shares: the model to train and its sharded state, the step count (steps or
epochs), resuming, the jitted and donated step, the log / eval / checkpoint cadence with progress and
throughput, micro-batched evaluation and the params-only export. Stage modules compose these pieces (`trainers.py`
for sft and rm); none of them copies the loop.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from rlhf_jax import sharding, steps
from rlhf_jax.checkpoint import LoadedModel, TrainCheckpoints, load_model, save_model
from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.errors import UserError
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.model import Transformer, _init_boxed, init_scalar_head, make_model, param_logical_axes
from rlhf_jax.tiny import resolve_model_path
from rlhf_jax.tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------- the model


def load_for_training(cfg: Config, run_dir: Path, head: str):
    """(loaded checkpoint, tokenizer, model with `head`) of cfg.model.path (the tiny built-in model when empty)."""
    loaded = load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed))
    if loaded.tokenizer_dir is None:
        raise UserError(f"{cfg.model.path}: the checkpoint has no tokenizer files")
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
    """GPT-2's learned positions end at max_position_embeddings (a longer sequence reads past the table and
    gives NaN); rotary models run past it, though they were not trained there."""
    limit = model_cfg.max_position_embeddings
    if length <= limit:
        return
    if model_cfg.is_gpt2:
        raise UserError(f"{keys} = {length} exceeds the model's {limit} positions")
    print(f"warning: {keys} = {length} exceeds the model's max_position_embeddings {limit}", file=sys.stderr)


def report_sharding(model: Transformer, mesh) -> None:
    """Print how the params are split over the mesh (one screen) and warn once per replicated fallback."""
    abstract = jax.eval_shape(lambda: nn.unbox(_init_boxed(model, jax.random.key(0))))
    sharding.print_sharding_report(sharding.sharding_report(param_logical_axes(model), abstract, mesh))


def initial_params(loaded: LoadedModel, model: Transformer, seed: int) -> dict:
    """Host params in the model's layout and parameter dtype."""
    params = with_head(loaded.params, loaded.cfg, loaded.head, model.head, jax.random.key(seed))
    return jax.tree.map(lambda x: np.asarray(x).astype(model.param_dtype), params)


def state_shardings(model: Transformer, optimizer, mesh):
    """NamedShardings of the whole TrainState from the params' logical names: optimizer moments inherit them."""
    boxed = jax.eval_shape(lambda: _init_boxed(model, jax.random.key(0)))
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
    """One run directory: metrics (JSONL + TensorBoard), Orbax checkpoints and the loop facts saved with them."""

    def __init__(self, cfg: Config, run_dir: Path, stage: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.ckpts = TrainCheckpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.writer = MetricsWriter(run_dir, stage)
        self.facts: dict = {"seed": cfg.seed}  # small JSON facts of the loop (e.g. the best eval loss)

    def resume(self, state, data_iter):
        """(state, first step to run): the latest checkpoint's state, data position and facts, or step 0."""
        start = self.ckpts.latest_step() or 0
        if not start:
            return state, 0
        state, data_state, facts = self.ckpts.restore(start, state)
        if facts["seed"] != self.cfg.seed:  # data order and step keys derive from the seed
            raise UserError(f"{self.run_dir / 'checkpoints'} was trained with seed={facts['seed']}; resume with "
                            "that seed or start a new run_dir")
        data_iter.set_state(data_state)
        self.facts = facts
        print(f"resumed from {self.run_dir / 'checkpoints'} at step {start}", file=sys.stderr)
        return state, start

    def save(self, step: int, state, data_iter) -> None:
        self.ckpts.save(step, state, data_iter.get_state(), self.facts, config_to_dict(self.cfg))

    def close(self) -> None:
        self.ckpts.close()
        self.writer.close()


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


def drive(run: Run, state, *, start: int, total: int, data_iter, step_fn, mesh, desc: str,
          count_tokens: Callable[[dict], int], cadence: Cadence, on_eval: Callable | None = None):
    """Runs steps start..total-1 of `step_fn` on batches of `data_iter` (a resumable iterator): logs metrics
    (with tokens/s and the running count of truncated examples), calls `on_eval(done, state) -> metrics` and
    saves on the cadence. Returns (state, the last logged metrics, eval metrics included)."""
    rng = jax.random.key(run.cfg.seed)
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    last: dict = {}
    window_start, window_tokens, truncated = time.perf_counter(), 0, 0
    for step in range(start, total):
        batch = next(data_iter)
        window_tokens += count_tokens(batch)
        truncated += int(batch["truncated"].sum())
        state, metrics = step_fn(state, to_global(batch, mesh), jax.random.fold_in(rng, step))
        done = step + 1
        if cadence.log(done):
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics["tokens_per_s"] = window_tokens / (time.perf_counter() - window_start)
            metrics["truncated_examples"] = truncated  # over-length examples cut so far in this run
            run.writer.write(done, metrics)
            bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss",) if k in metrics},
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            last = metrics
        if on_eval is not None and cadence.eval(done):
            eval_metrics = {f"eval_{k}": v for k, v in on_eval(done, state).items()}
            if eval_metrics:
                run.writer.write(done, eval_metrics)
                last.update(eval_metrics)
        if cadence.save(done):
            run.save(done, state, data_iter)
        if cadence.log(done):  # throughput windows exclude evaluation and saving
            window_start, window_tokens = time.perf_counter(), 0
        bar.update(1)
    bar.close()
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


def export(out_dir: Path, params, loaded: LoadedModel, model: Transformer, extra: dict | None = None) -> Path:
    """Params-only model checkpoint (Orbax, with tokenizer) for the next stage and for convert --to-hf."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(np.float32), params)
    return save_model(out_dir, host, loaded.cfg, model.head, loaded.tokenizer_dir, overwrite=True, extra=extra)
