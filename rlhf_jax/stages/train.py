"""The sft, rm and dpo stages: what differs between them (head, step, evaluation, the final reward
normalisation, dpo's frozen reference in `dpo_parts`), trained by the loop that every training stage writes out
(`training/loop.py`).

Rerunning the same command resumes from the latest checkpoint (state, data iterator, loop facts), and on CPU
reaches bitwise the same params as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data.buckets import Trimmer
from rlhf_jax.data.pipeline import eval_batches, has_split, open_split, response_slots, train_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import Transformer, positions_from_mask
from rlhf_jax.rl import dpo
from rlhf_jax.runtime import distributed, sharding
from rlhf_jax.stages import dpo_parts
from rlhf_jax.training import steps
from rlhf_jax.training.loop import TrainingLoop
from rlhf_jax.training.run import Run, write_summary
from rlhf_jax.training.state import (
    check_duration, check_micro_batches, check_positions, eval_batch_size, eval_sums, export, export_adapter,
    frozen_shardings, initial_params, jit_step, model_key,
    load_for_training, micro_batch_size, place_state, report_sharding, split_trainable, state_shardings, to_global,
    total_steps)
from rlhf_jax.training.losses import last_token_values


HEADS = {"sft": "lm", "rm": "scalar", "dpo": "lm"}
KINDS = {"sft": "sft", "rm": "rankings", "dpo": "rankings"}  # of the dataset each stage trains on


class Stage:
    """What differs between sft, rm and dpo: step, eval reduction and its metrics. dpo's step and eval reduction
    take the frozen reference params as a last argument, unless dpo.precompute_reference (`dpo_parts`)."""

    def __init__(self, cfg: Config, model: Transformer, optimizer, schedule):
        self.cfg, self.model = cfg, model
        if cfg.stage == "sft":
            self.step = functools.partial(steps.sft_step, model=model, optimizer=optimizer, schedule=schedule,
                                          accum=cfg.optim.grad_accum_steps, loss_on_prompt=cfg.train.loss_on_prompt)
            self.eval_sums = functools.partial(steps.sft_eval_sums, model=model,
                                               loss_on_prompt=cfg.train.loss_on_prompt)
        elif cfg.stage == "rm":
            self.step = functools.partial(steps.rm_step, model=model, optimizer=optimizer, schedule=schedule,
                                          accum=cfg.optim.grad_accum_steps)
            self.eval_sums = functools.partial(steps.rm_eval_sums, model=model)
        else:
            self.step, self.eval_sums = dpo_parts.step_fns(cfg, model, optimizer, schedule)
        self._eval_jit = None

    def eval_fn(self, mesh):
        """The jitted eval reduction, compiled once per stage."""
        if self._eval_jit is None:
            self._eval_jit = sharding.jit(self.eval_sums, mesh, out_shardings=sharding.replicated(mesh))
        return self._eval_jit

    def eval_metrics(self, sums: dict) -> dict:
        if self.cfg.stage == "sft":
            loss = sums["nll_sum"] / max(sums["target_tokens"], 1.0)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": sums["target_tokens"]}
        metrics = steps.rm_metrics(sums) if self.cfg.stage == "rm" else dpo.dpo_metrics(sums)
        return {k: float(v) for k, v in metrics.items()}


def check_config(cfg: Config) -> None:
    """What can be known wrong before reading any file."""
    if not cfg.data.name:
        raise UserError(f"stage {cfg.stage!r} needs data.name (a dataset prepared with python -m rlhf_jax.data)")
    check_duration(cfg)
    check_micro_batches(cfg)


def train(cfg: Config, run_dir: Path, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Run the sft, rm or dpo stage in `run_dir` (resuming from its latest checkpoint) on `mesh` (default: from
    cfg.mesh over all devices); returns the summary it also prints."""
    check_config(cfg)
    # The data is checked before any model is loaded.
    source, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
    kind = KINDS[cfg.stage]
    if metadata["kind"] != kind:
        raise UserError(f"data.name={cfg.data.name!r} is a {metadata['kind']!r} dataset; stage {cfg.stage!r} needs "
                        f"one of kind {kind!r}")
    response_slots(kind, metadata, cfg.data)
    if cfg.stage == "rm" and cfg.rm.normalize != "none" and cfg.rm.reference_dataset:
        check_reference_dataset(cfg)  # read after training: checked before it
    has_eval = has_split(cfg.data, cfg.data.eval_split)
    if not has_eval:
        print(f"warning: dataset {cfg.data.name!r} has no split {cfg.data.eval_split!r}: no held-out evaluation "
              "and no best/ export", file=sys.stderr)
    mesh = mesh or sharding.mesh_from_config(cfg.mesh)
    micro_batch_size(cfg, mesh)
    eval_size = eval_batch_size(cfg, mesh)
    total = total_steps(cfg, len(source))
    if cfg.stage == "rm":
        _warn_if_repeating(cfg, total, len(source))

    loaded, tokenizer, model = load_for_training(cfg, run_dir, HEADS[cfg.stage])
    params = initial_params(loaded, model, cfg.seed)
    reference_host = dpo_parts.reference_host_params(cfg, loaded, model, params) if cfg.stage == "dpo" else None
    check_positions(loaded.cfg, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
                    "data.max_prompt_tokens + data.max_response_tokens", model_key(cfg))
    schedule = steps.lr_schedule(cfg.optim, total)
    optimizer = steps.make_optimizer(cfg.optim, total)
    stage = Stage(cfg, model, optimizer, schedule)
    state_sh, frozen_sh = state_shardings(model, optimizer, mesh), frozen_shardings(model, mesh)
    report_sharding(model, mesh)
    trainable, frozen = split_trainable(model, params)
    state = place_state(trainable, optimizer, state_sh)
    frozen = sharding.place(frozen, frozen_sh)  # a LoRA model's base: never donated, never checkpointed
    splits = (cfg.data.train_split, cfg.data.eval_split) if has_eval else (cfg.data.train_split,)
    reference = dpo_parts.Reference.build(cfg, run_dir, reference_host, model, mesh, tokenizer, eval_size, splits,
                                          frozen, frozen_sh)
    del params, trainable, reference_host  # on the mesh now
    train_step = jit_step(stage.step, state_sh, mesh, frozen_sh, *reference.shardings)
    trim = Trimmer(cfg.data, distributed.max_over_processes)
    data_iter = reference.train_batches(
        iter(train_dataset(cfg.data, cfg.data.train_split, tokenizer, cfg.train.batch_size, cfg.seed)),
        cfg.data.train_split)

    whole = lambda state: steps.whole_params(state.params, frozen)  # what evaluation and export read
    run = Run(cfg, run_dir, cfg.stage, models=reference.models)
    state, start = run.resume(state, data_iter, total)
    run.facts.setdefault("best_eval_loss", None)

    def evaluate_and_keep_best(state) -> dict:
        """Held-out metrics; a new best eval loss exports the params to best/."""
        batches = map(trim, reference.eval_batches(eval_batches(cfg.data, cfg.data.eval_split, tokenizer, eval_size),
                                                   cfg.data.eval_split))
        eval_fn = stage.eval_fn(mesh)
        sums = eval_sums(lambda p, b: eval_fn(p, b, *reference.frozen), whole(state), batches, mesh,
                         cfg.train.eval_batches)
        if not sums:
            return {}
        metrics = stage.eval_metrics(sums)
        best = run.facts["best_eval_loss"]
        # a non-finite loss is never best: stored, no later loss would compare below it
        if math.isfinite(metrics["loss"]) and (best is None or metrics["loss"] < best):
            run.facts["best_eval_loss"] = metrics["loss"]
            # a reward model's best/ scores in the same normalised units as its export/ (PPO reads either)
            norm = fit_reward_norm(cfg, stage, whole(state), tokenizer, mesh, eval_size) if cfg.stage == "rm" else {}
            export(run_dir / "best", whole(state), loaded, model, norm, chat_template=cfg.data.chat_template)
        return metrics

    try:
        with TrainingLoop(run, start, total, cfg.stage, has_eval) as loop:
            for step in loop:
                batch = trim(next(data_iter))  # to its length bucket
                state, metrics = train_step(state, to_global(batch, mesh), loop.rng(step), frozen, *reference.frozen)
                loop.log(step, metrics, items=real_tokens(batch), truncated=batch["truncated"].sum())
                if loop.eval_due(step):
                    loop.log_eval(step, evaluate_and_keep_best(state))
                loop.save_when_due(step, state, data_iter)
    finally:
        run.close()  # pending asynchronous saves complete (or report their failure) before the run ends
    extra = fit_reward_norm(cfg, stage, whole(state), tokenizer, mesh, eval_size) if cfg.stage == "rm" else {}
    out = export(run_dir / "export", whole(state), loaded, model, extra, chat_template=cfg.data.chat_template)
    exports = {"export": str(out)}
    if model.lora is not None:
        exports["adapter_export"] = str(export_adapter(run_dir / "export_adapter", whole(state), loaded, model,
                                                       cfg.model.path, extra))
    return write_summary(run_dir, cfg.stage, total, exports, loop.last, extra)


def _warn_if_repeating(cfg: Config, total: int, train_prompts: int) -> None:
    """A reward model trained past one epoch by its step count; train.epochs above 1 asks for the repeats."""
    seen = total * cfg.train.batch_size
    if seen > train_prompts and not cfg.train.epochs:
        print(f"warning: rm: {total} steps x {cfg.train.batch_size} prompts = {seen} > {train_prompts} training "
              f"prompts, so some comparisons are seen {seen / train_prompts:.2f} times; InstructGPT trains the "
              "reward model for one epoch (train.epochs=1) because more overfits", file=sys.stderr)


def real_tokens(batch: dict) -> int:
    """Non-padding tokens a step processes; a ranking prompt counts once per response it is scored with."""
    if "mask" in batch:
        return int(batch["mask"].sum())
    responses_B = batch["response_mask"].any(-1).sum(1)
    return int((batch["prompt_mask"].sum(1) * responses_B).sum() + batch["response_mask"].sum())


MAX_QUIET_GAIN = 100.0  # a larger reward_norm gain is warned about: reference scores with a std below 0.01


def fit_reward_norm(cfg: Config, stage: Stage, params, tokenizer, mesh, batch_size: int) -> dict:
    """Gain and bias so that reference responses score mean 0 (and std 1 with 'bias_gain'):
    normalised reward = gain * reward + bias. Stored in the exported model's model.json."""
    if cfg.rm.normalize == "none":
        return {}
    rewards = reference_rewards(cfg, stage.model, params, tokenizer, mesh, batch_size)
    if len(rewards) < 2:
        raise UserError("reward normalisation needs at least 2 reference responses")
    gain = 1.0 / max(float(np.std(rewards)), 1e-6) if cfg.rm.normalize == "bias_gain" else 1.0
    bias = -gain * float(np.mean(rewards))
    if gain > MAX_QUIET_GAIN:  # PPO's scores on another scale than its KL penalty, and the RM's noise magnified
        print(f"warning: the reward model scores the {len(rewards)} reference responses nearly alike (std "
              f"{float(np.std(rewards)):.2g}): rm.normalize=bias_gain multiplies every reward by {gain:.3g}; "
              "rm.normalize=bias keeps their scale", file=sys.stderr)
    return {"reward_norm": {"gain": gain, "bias": bias, "reference_responses": len(rewards),
                            "reference": cfg.rm.reference_dataset or f"{cfg.data.name}:best"}}


def best_responses(pairs_BKK: np.ndarray) -> np.ndarray:
    """best_BK: responses preferred at least once and never dispreferred (a ranking's rank-0 responses)."""
    return (pairs_BKK.sum(2) > 0) & (pairs_BKK.sum(1) == 0)


def check_reference_dataset(cfg: Config) -> None:
    """rm.reference_dataset is a prepared sft dataset (its responses are the reference)."""
    name = cfg.rm.reference_dataset
    spec = dataclasses.replace(cfg.data, name=name)
    split = cfg.data.eval_split if has_split(spec, cfg.data.eval_split) else cfg.data.train_split
    try:
        _, metadata = open_split(cfg.data.dir, name, split)
    except UserError as e:
        raise UserError(f"rm.reference_dataset={name!r}: {e}") from None
    if metadata["kind"] != "sft":
        raise UserError(f"rm.reference_dataset={name!r} is a {metadata['kind']!r} dataset; the reference responses "
                        "come from one of kind 'sft'")


def reference_rewards(cfg: Config, model: Transformer, params, tokenizer, mesh, batch_size: int) -> np.ndarray:
    """Raw rewards of the reference responses: an sft dataset's demonstrations, or the best responses of the
    rankings, scored `batch_size` rows at a time."""
    limit = cfg.rm.reference_examples
    out: list[float] = []
    if cfg.rm.reference_dataset:
        spec = dataclasses.replace(cfg.data, name=cfg.rm.reference_dataset, pack=False)
        split = cfg.data.eval_split if has_split(spec, cfg.data.eval_split) else cfg.data.train_split
        fn = jax.jit(lambda p, b: last_token_values(
            model.apply({"params": p}, b["ids"], positions_from_mask(b["mask"]), b["mask"])[0], b["mask"]))
        select = lambda batch: batch["valid"]
    else:
        spec = cfg.data
        split = cfg.data.eval_split if has_split(cfg.data, cfg.data.eval_split) else cfg.data.train_split
        fn = jax.jit(functools.partial(steps.completion_rewards, model))
        select = lambda batch: best_responses(batch["pairs"]) & batch["valid"][:, None]
    for batch in eval_batches(spec, split, tokenizer, batch_size):
        # every process's rows, and which of them to keep, gathered the same way
        rewards, keep = distributed.to_host((fn(params, to_global(batch, mesh)),
                                             to_global({"keep": select(batch)}, mesh)["keep"]))
        out.extend(rewards[keep].tolist())
        if len(out) >= limit:
            break
    return np.asarray(out[:limit])
