"""Host loops of the sft and rm stages: build or restore the state, run the jitted, sharded, donated step,
evaluate, checkpoint, and export a params-only model for the next stage.

Rerunning the same command resumes from the latest checkpoint (state, data iterator, loop facts), and on CPU
reaches bitwise the same params as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from rlhf_jax import sharding, steps
from rlhf_jax.checkpoint import LoadedModel, TrainCheckpoints, load_model, save_model
from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.data.pipeline import eval_batches, open_split, train_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.losses import last_token_values
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.model import Transformer, _init_boxed, init_params, make_model, positions_from_mask
from rlhf_jax.tiny import resolve_model_path
from rlhf_jax.tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------- setup


def initial_params(loaded: LoadedModel, model: Transformer, seed: int) -> dict:
    """Loaded params in the model's layout; a language model becoming a reward model gets a fresh scalar head."""
    params = dict(loaded.params)
    if model.head == "scalar" and loaded.head == "lm":
        params.pop("lm_head", None)
        params["score"] = np.asarray(init_params(model, jax.random.key(seed))["score"])
    elif model.head != loaded.head:
        raise UserError(f"cannot train a {model.head!r}-head model from a {loaded.head!r}-head checkpoint")
    return jax.tree.map(lambda x: np.asarray(x).astype(model.param_dtype), params)


def state_shardings(model: Transformer, optimizer, mesh):
    """NamedShardings of the whole TrainState from the params' logical names: optimizer moments inherit them."""
    boxed = jax.eval_shape(lambda: _init_boxed(model, jax.random.key(0)))
    abstract = jax.eval_shape(lambda p: steps.init_state(p, optimizer), boxed)
    specs = nn.get_partition_spec(abstract)
    shapes = nn.unbox(abstract)
    return jax.tree.map(lambda spec, x: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        tuple(spec), x.shape, mesh)), specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def to_global(batch: dict, mesh) -> dict:
    """This host's rows -> one global array per key, split over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- stages


class _Stage:
    """What differs between sft and rm: head, step, eval reduction and the metric that picks the best model."""

    def __init__(self, cfg: Config, model: Transformer, optimizer, schedule):
        self.cfg, self.model = cfg, model
        if cfg.stage == "sft":
            self.step = functools.partial(steps.sft_step, model=model, optimizer=optimizer, schedule=schedule,
                                          accum=cfg.optim.grad_accum_steps, loss_on_prompt=cfg.train.loss_on_prompt)
            self.eval_sums = functools.partial(steps.sft_eval_sums, model=model,
                                               loss_on_prompt=cfg.train.loss_on_prompt)
        else:
            self.step = functools.partial(steps.rm_step, model=model, optimizer=optimizer, schedule=schedule,
                                          accum=cfg.optim.grad_accum_steps)
            self.eval_sums = functools.partial(steps.rm_eval_sums, model=model)

    def eval_fn(self, mesh):
        """The jitted eval reduction, compiled once per stage."""
        if not hasattr(self, "_eval_jit"):
            self._eval_jit = jax.jit(self.eval_sums, out_shardings=sharding.replicated(mesh))
        return self._eval_jit

    def eval_metrics(self, sums: dict) -> dict:
        if self.cfg.stage == "sft":
            loss = sums["nll_sum"] / max(sums["target_tokens"], 1.0)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": sums["target_tokens"]}
        return {k: float(v) for k, v in steps.rm_metrics(sums).items()}


def train(cfg: Config, run_dir: Path, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Run the sft or rm stage in `run_dir` (resuming from its latest checkpoint) on `mesh` (default: from
    cfg.mesh over all devices); returns the summary it also prints."""
    if cfg.train.batch_size % cfg.optim.grad_accum_steps:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                        f"optim.grad_accum_steps={cfg.optim.grad_accum_steps}")
    if not cfg.data.name:
        raise UserError(f"stage {cfg.stage!r} needs data.name (a dataset prepared with python -m rlhf_jax.data)")
    open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)  # a missing dataset fails before any loading
    has_eval = _has_split(cfg.data, cfg.data.eval_split)
    if not has_eval:
        print(f"warning: dataset {cfg.data.name!r} has no split {cfg.data.eval_split!r}: no held-out evaluation "
              "and no best/ export", file=sys.stderr)
    mesh = mesh or sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    micro = cfg.train.batch_size // cfg.optim.grad_accum_steps
    sharding.check_batch_size(micro, mesh, "train.batch_size" if cfg.optim.grad_accum_steps == 1 else
                              f"train.batch_size / optim.grad_accum_steps ({cfg.train.batch_size} / "
                              f"{cfg.optim.grad_accum_steps})")
    loaded = load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed))
    if loaded.tokenizer_dir is None:
        raise UserError(f"{cfg.model.path}: the checkpoint has no tokenizer files")
    tokenizer = load_tokenizer(loaded.tokenizer_dir)
    head = "lm" if cfg.stage == "sft" else "scalar"
    model = make_model(loaded.cfg, head, cfg.model.dtype, cfg.model.param_dtype, remat=cfg.model.remat == "block")
    schedule = steps.lr_schedule(cfg.optim, cfg.train.steps)
    optimizer = steps.make_optimizer(cfg.optim, cfg.train.steps)
    stage = _Stage(cfg, model, optimizer, schedule)

    state_sh = state_shardings(model, optimizer, mesh)
    init = jax.jit(lambda p: steps.init_state(p, optimizer), in_shardings=(state_sh.params,), out_shardings=state_sh)
    state = init(initial_params(loaded, model, cfg.seed))
    data = train_dataset(cfg.data, cfg.data.train_split, tokenizer, cfg.train.batch_size, cfg.seed)
    data_iter = iter(data)
    batch_sh = sharding.batch_sharding(mesh)  # a prefix: applies to every array of the batch
    repl = sharding.replicated(mesh)
    step_fn = jax.jit(stage.step, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                      donate_argnums=0)

    ckpts = TrainCheckpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    loop = {"best_eval_loss": None, "seed": cfg.seed}
    start = ckpts.latest_step() or 0
    if start:
        state, data_state, loop = ckpts.restore(start, state)
        if loop["seed"] != cfg.seed:  # data order and step keys derive from the seed
            raise UserError(f"{run_dir / 'checkpoints'} was trained with seed={loop['seed']}; resume with that seed "
                            "or start a new run_dir")
        data_iter.set_state(data_state)
        print(f"resumed from {run_dir / 'checkpoints'} at step {start}", file=sys.stderr)

    rng = jax.random.key(cfg.seed)
    total = cfg.train.steps
    writer = MetricsWriter(run_dir, cfg.stage)
    bar = tqdm(total=total, initial=start, desc=cfg.stage, unit="step", file=sys.stderr, dynamic_ncols=True)
    last_metrics: dict = {}
    window_start, window_tokens, truncated = time.perf_counter(), 0, 0
    for step in range(start, total):
        batch = next(data_iter)
        window_tokens += real_tokens(batch)
        truncated += int(batch["truncated"].sum())
        state, metrics = step_fn(state, to_global(batch, mesh), jax.random.fold_in(rng, step))
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            metrics["tokens_per_s"] = window_tokens / elapsed
            metrics["truncated_examples"] = truncated  # over-length examples cut so far in this run
            window_start, window_tokens = time.perf_counter(), 0
            writer.write(done, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            last_metrics = metrics
        if has_eval and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total):
            eval_metrics = evaluate(cfg, stage, state.params, tokenizer, mesh)
            if eval_metrics:
                writer.write(done, {f"eval_{k}": v for k, v in eval_metrics.items()})
                if loop["best_eval_loss"] is None or eval_metrics["loss"] < loop["best_eval_loss"]:
                    loop["best_eval_loss"] = eval_metrics["loss"]
                    export(run_dir / "best", state.params, loaded, model)
                last_metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == total:
            ckpts.save(done, state, data_iter.get_state(), loop, config_to_dict(cfg))
        if done % cfg.train.log_every == 0:  # throughput windows exclude evaluation and saving
            window_start = time.perf_counter()
        bar.update(1)
    bar.close()
    ckpts.close()
    writer.close()
    extra = fit_reward_norm(cfg, stage, state.params, tokenizer, mesh) if cfg.stage == "rm" else {}
    out = export(run_dir / "export", state.params, loaded, model, extra)
    summary = {"stage": cfg.stage, "steps": total, "export": str(out),
               **{k: round(v, 6) for k, v in last_metrics.items() if isinstance(v, float)}, **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


def real_tokens(batch: dict) -> int:
    """Non-padding tokens a step processes; a ranking prompt counts once per response it is scored with."""
    if "mask" in batch:
        return int(batch["mask"].sum())
    responses_B = (batch["ranks"] >= 0).sum(1)
    return int((batch["prompt_mask"].sum(1) * responses_B).sum() + batch["response_mask"].sum())


def export(out_dir: Path, params, loaded: LoadedModel, model: Transformer, extra: dict | None = None):
    """Params-only model checkpoint (Orbax, with tokenizer) for the next stage and for convert --to-hf."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(np.float32), params)
    return save_model(out_dir, host, loaded.cfg, model.head, loaded.tokenizer_dir, overwrite=True, extra=extra)


def evaluate(cfg: Config, stage: _Stage, params, tokenizer, mesh) -> dict:
    """Held-out metrics over the eval split (or its first train.eval_batches batches)."""
    fn = stage.eval_fn(mesh)
    totals: dict = {}
    for i, batch in enumerate(eval_batches(cfg.data, cfg.data.eval_split, tokenizer, cfg.train.batch_size)):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        sums = jax.device_get(fn(params, to_global(batch, mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return stage.eval_metrics(totals) if totals else {}


def fit_reward_norm(cfg: Config, stage: _Stage, params, tokenizer, mesh) -> dict:
    """Gain and bias so that reference responses score mean 0 (and std 1 with 'bias_gain'):
    normalised reward = gain * reward + bias. Stored in the exported model's model.json."""
    if cfg.rm.normalize == "none":
        return {}
    rewards = reference_rewards(cfg, stage.model, params, tokenizer, mesh)
    if len(rewards) < 2:
        raise UserError("reward normalisation needs at least 2 reference responses")
    gain = 1.0 / max(float(np.std(rewards)), 1e-6) if cfg.rm.normalize == "bias_gain" else 1.0
    bias = -gain * float(np.mean(rewards))
    return {"reward_norm": {"gain": gain, "bias": bias, "reference_responses": len(rewards),
                            "reference": cfg.rm.reference_dataset or f"{cfg.data.name}:rank-0"}}


def reference_rewards(cfg: Config, model: Transformer, params, tokenizer, mesh) -> np.ndarray:
    """Raw rewards of the reference responses: an sft dataset's demonstrations, or the best-ranked responses."""
    import dataclasses

    B, limit = cfg.train.batch_size, cfg.rm.reference_examples
    out: list[float] = []
    if cfg.rm.reference_dataset:
        spec = dataclasses.replace(cfg.data, name=cfg.rm.reference_dataset, pack=False)
        split = cfg.data.eval_split if _has_split(spec, cfg.data.eval_split) else cfg.data.train_split
        fn = jax.jit(lambda p, b: last_token_values(
            model.apply({"params": p}, b["ids"], positions_from_mask(b["mask"]), b["mask"])[0], b["mask"]))
        for batch in eval_batches(spec, split, tokenizer, B):
            r = np.asarray(jax.device_get(fn(params, to_global(batch, mesh))))
            out.extend(r[batch["valid"]].tolist())
            if len(out) >= limit:
                break
    else:
        split = cfg.data.eval_split if _has_split(cfg.data, cfg.data.eval_split) else cfg.data.train_split
        fn = jax.jit(functools.partial(steps.completion_rewards, model))
        for batch in eval_batches(cfg.data, split, tokenizer, B):
            r = np.asarray(jax.device_get(fn(params, to_global(batch, mesh))))
            best = (batch["ranks"] == 0) & batch["valid"][:, None]
            out.extend(r[best].tolist())
            if len(out) >= limit:
                break
    return np.asarray(out[:limit])


def _has_split(spec, split: str) -> bool:
    try:
        open_split(spec.dir, spec.name, split)
        return True
    except UserError:
        return False
