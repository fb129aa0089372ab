"""The ppo stage: the policy (model.path, the SFT export) against a frozen reward model (ppo.reward_model), with
a value model initialised from it (or from ppo.value_model) and the initial policy as the KL reference. Each
iteration is one compiled program (`ppo.iteration`); this host loop only feeds prompts, logs and checkpoints,
in the training loop every stage writes out (resume, divergence and signal stops, corrupt checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data.buckets import Trimmer
from rlhf_jax.data.pipeline import open_split, train_dataset
from rlhf_jax.data.prepare import dataset_dir
from rlhf_jax.errors import UserError
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.rl import ppo
from rlhf_jax.rl.ppo_math import KLController
from rlhf_jax.runtime import distributed, sharding
from rlhf_jax.runtime.clock import LapClock
from rlhf_jax.runtime.metrics import drop_lines_after
from rlhf_jax.stages.policy_common import (
    check_own_samples, check_reads_policy_tokens, check_reference, load_policy, open_prompts, reference_beyond_base,
    policy_sampling, reference_shardings, scalar_model, write_samples)
from rlhf_jax.training import steps
from rlhf_jax.training.loop import TrainingLoop
from rlhf_jax.training.run import Run, write_summary
from rlhf_jax.training.state import (
    check_duration, check_lora, check_positions, export, export_adapter, frozen_shardings, initial_params,
    model_key, param_shardings, report_sharding, split_trainable, stage_model, state_shardings, to_global, total_steps,
    trained_model)
from rlhf_jax.training.steps import whole_params


def check_config(cfg: Config) -> None:
    """Everything that can be known wrong before loading a model."""
    check_lora(cfg)
    if not cfg.ppo.reward_model:
        raise UserError("stage 'ppo' needs ppo.reward_model (a reward model export from the rm stage)")
    if not cfg.data.name:
        raise UserError("stage 'ppo' needs data.name (a prompts dataset: python -m rlhf_jax.data --format "
                        "jsonl_prompts ...)")
    check_duration(cfg)
    _check_splits(cfg, ways=1)  # the devices' share is checked with the mesh
    if cfg.ppo.ptx_coef and not cfg.ppo.ptx_dataset:
        raise UserError("ppo.ptx_coef > 0 needs ppo.ptx_dataset (a prepared sft dataset for the LM loss)")
    if cfg.ppo.ptx_dataset and not cfg.ppo.ptx_coef:
        print(f"warning: ppo.ptx_dataset={cfg.ppo.ptx_dataset!r} is not used: ppo.ptx_coef is 0 (PPO-ptx off)",
              file=sys.stderr)
    check_own_samples(cfg.sampling, "ppo")


def check_sizes(cfg: Config, mesh) -> None:
    """Every minibatch of the rollout (and of the ptx rows) splits into optim.grad_accum_steps micro-batches over
    the data-parallel devices."""
    _check_splits(cfg, math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh)))


def _check_splits(cfg: Config, ways: int) -> None:
    sizes = [("train.batch_size", cfg.train.batch_size)]
    if cfg.ppo.ptx_coef:
        sizes.append(("ppo.ptx_batch_size", _ptx_batch(cfg)))
    accum = cfg.optim.grad_accum_steps
    for key, size in sizes:
        if size % cfg.ppo.minibatches or (size // cfg.ppo.minibatches) % (accum * ways):
            micro = f" of optim.grad_accum_steps={accum} micro-batches each" if accum > 1 else ""
            devices = f" divisible by the {ways} data-parallel devices" if ways > 1 else ""
            raise UserError(f"{key}={size} must split into ppo.minibatches={cfg.ppo.minibatches} minibatches{micro}"
                            f"{devices}")


def kl_on_resume(cfg: Config):
    """`Run.resume`'s adjustment of the restored KL coefficient: with a fixed penalty (ppo.kl_target 0)
    beta is ppo.kl_coef, also a changed one; the adaptive controller goes on from the restored beta, which
    ppo.kl_coef only started."""
    def adjust(state, stored_config: dict):
        beta = float(state.kl.beta)
        if not cfg.ppo.kl_target:
            if beta == np.float32(cfg.ppo.kl_coef):
                return state, ""
            kl = KLController(jax.device_put(np.float32(cfg.ppo.kl_coef), state.kl.beta.sharding))
            return state.replace(kl=kl), f"beta is now ppo.kl_coef={cfg.ppo.kl_coef} (was {beta:.6g})"
        if stored_config.get("ppo", {}).get("kl_coef") != cfg.ppo.kl_coef:
            return state, (f"ppo.kl_coef is not applied: the adaptive KL controller (ppo.kl_target) continues "
                           f"from the restored beta {beta:.6g}")
        return state, ""
    return adjust


def train_ppo(cfg: Config, run_dir: Path, mesh: jax.sharding.Mesh | None = None) -> dict:
    check_config(cfg)
    source = open_prompts(cfg, "ppo")
    ptx_spec = _ptx_spec(cfg)
    mesh = mesh or sharding.mesh_from_config(cfg.mesh)
    check_sizes(cfg, mesh)
    total = total_steps(cfg, len(source))

    loaded, tokenizer, policy_model = load_policy(cfg, run_dir)
    if ptx_spec is not None:
        check_positions(loaded.cfg, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
                        "data.max_prompt_tokens + data.max_response_tokens (the ptx rows)", model_key(cfg))
    reward = scalar_model(cfg.ppo.reward_model, "ppo.reward_model", "reward")
    value = scalar_model(cfg.ppo.value_model, "ppo.value_model", "reward", "value") if cfg.ppo.value_model else reward
    scalars = {"ppo.reward_model": (cfg.ppo.reward_model, reward)}
    if cfg.ppo.value_model:
        scalars["ppo.value_model"] = (cfg.ppo.value_model, value)
    for key, (path, other) in scalars.items():
        check_reads_policy_tokens(other, loaded, key, path, cfg)
    check_reference(cfg.ppo.reference, "ppo.reference", loaded, cfg.data.chat_template)  # before anything compiles
    value_model, reward_model = trained_model(cfg, value.cfg, "scalar"), stage_model(cfg, reward.cfg, "scalar")

    models, settings = build_models(cfg, policy_model, value_model, reward_model, total,
                          policy_sampling(cfg, tokenizer, loaded.cfg), reward.extra.get("reward_norm"),
                          value.extra.get("reward_norm"))
    repl = sharding.replicated(mesh)
    state_sh, frozen_sh = iteration_shardings(cfg, models, mesh)
    policy_sh, value_sh, reward_sh = state_sh.policy, state_sh.value, frozen_sh.reward_params
    report_sharding(policy_model, mesh)

    policy_params, policy_base = split_trainable(policy_model, initial_params(loaded, policy_model, cfg.seed))
    value_params, value_base = split_trainable(value_model, initial_params(value, value_model, cfg.seed))
    init = jax.jit(lambda p, v, key: ppo.init_state(p, v, models, settings, key),
                   in_shardings=(policy_sh.params, value_sh.params, repl), out_shardings=state_sh)
    state = init(policy_params, value_params, jax.random.PRNGKey(cfg.seed))
    # The frozen params are separate buffers from the state, which is donated every iteration. A LoRA policy's
    # reference is its base, and a LoRA value model from the reward model shares that model's base.
    reference = reference_beyond_base(cfg.ppo.reference, "ppo.reference", loaded, policy_model, policy_params,
                                      cfg.seed)
    frozen = ppo.Frozen(ref_params=sharding.place(reference, frozen_sh.ref_params),
                        reward_params=sharding.place(initial_params(reward, reward_model, cfg.seed), reward_sh),
                        policy_base=sharding.place(policy_base, frozen_sh.policy_base),
                        value_base=None if frozen_sh.value_base is None else sharding.place(value_base,
                                                                                            frozen_sh.value_base))
    del policy_params, value_params, policy_base, value_base
    trim = Trimmer(cfg.data, distributed.max_over_processes)
    data_iter = iter(train_dataset(cfg.data, cfg.data.train_split, tokenizer, cfg.train.batch_size, cfg.seed))
    if ptx_spec is not None:  # prompts and pretraining rows advance, and are checkpointed, together
        ptx_iter = iter(train_dataset(ptx_spec, ptx_spec.train_split, tokenizer, _ptx_batch(cfg), cfg.seed + 1))
        data_iter = PromptsAndPtx(data_iter, ptx_iter)

    if cfg.ppo.reference:
        scalars["ppo.reference"] = (cfg.ppo.reference, None)
    read = {key: path for key, (path, _) in scalars.items()}
    if ptx_spec is not None:  # fingerprinted as data.name is: the saved position counts batches of this dataset
        read["ppo.ptx_dataset"] = dataset_dir(ptx_spec.dir, ptx_spec.name)
    run = Run(cfg, run_dir, "ppo", models=read)
    state, start = run.resume(state, data_iter, total, adjust=kl_on_resume(cfg))
    if distributed.is_primary():  # process 0 writes the run's files
        drop_lines_after(run_dir / "samples.jsonl", start)  # written again by the iterations after `start`
    iteration = jit_iteration(models, settings, state_sh, frozen_sh, mesh, LapClock())

    try:
        with TrainingLoop(run, start, total, "ppo", rate_name="episodes_per_s") as loop:
            for step in loop:
                batch = trim(next(data_iter))  # to its length bucket
                prompts, ptx = split_ptx(to_global(batch, mesh))
                state, metrics = iteration(state, frozen, prompts["prompt_ids"], prompts["prompt_mask"], ptx)
                samples = metrics.pop("samples", None)
                loop.log(step, metrics, items=len(batch["prompt_ids"]), truncated=batch["truncated"].sum())
                if samples is not None and step % cfg.ppo.samples_every == 0 and distributed.is_primary():
                    write_samples(run_dir / "samples.jsonl", step, distributed.to_host(samples), tokenizer)
                loop.save_when_due(step, state, data_iter)
    finally:
        run.close()
    policy_base, value_base = frozen.bases()
    chat = cfg.data.chat_template
    out = export(run_dir / "export", whole_params(state.policy.params, policy_base), loaded, policy_model,
                 chat_template=chat)
    # The value head's normalisation travels with it: reading it back (ppo.value_model) applies it again.
    value_norm = {"reward_norm": {"gain": settings.value_gain, "bias": settings.value_bias}}
    value_out = export(run_dir / "export_value", whole_params(state.value.params, value_base), value, value_model,
                       value_norm, role="value", chat_template=chat)
    exports = {"export": str(out), "value_export": str(value_out)}
    if policy_model.lora is not None:
        exports["adapter_export"] = str(export_adapter(run_dir / "export_adapter",
                                                       whole_params(state.policy.params, policy_base), loaded,
                                                       policy_model, cfg.model.path))
    if value_model.lora is not None:
        exports["value_adapter_export"] = str(export_adapter(
            run_dir / "export_value_adapter", whole_params(state.value.params, value_base), value, value_model,
            cfg.ppo.value_model or cfg.ppo.reward_model, value_norm))
    if state.ema is not None:
        exports["ema_export"] = str(export(run_dir / "export_ema", whole_params(state.ema, policy_base), loaded,
                                           policy_model, chat_template=chat))
    return write_summary(run_dir, "ppo", total, exports, loop.last)


SAMPLES = 4  # rollout rows written to samples.jsonl every ppo.samples_every iterations


# The iteration's program, built the same way by train_ppo and by the dry run (rlhf_jax/plan/).


def build_models(cfg: Config, policy_model, value_model, reward_model, total: int, sampling: SamplingParams,
                 reward_norm: dict | None = None, value_norm: dict | None = None
                 ) -> tuple[ppo.PPOModels, ppo.PPOSettings]:
    """The static parts of an iteration: the models with both optimizers over `total` iterations' updates, and
    the settings. `sampling`: the rollouts' (`policy_sampling`); `reward_norm` / `value_norm`: the `reward_norm`
    ({gain, bias}) of the exports the two scalar models come from."""
    updates = total * cfg.ppo.epochs * cfg.ppo.minibatches
    value_optim = dataclasses.replace(cfg.optim, lr=cfg.ppo.value_lr or cfg.optim.lr)
    norm, vnorm = reward_norm or {}, value_norm or {}
    models = ppo.PPOModels(
        policy=policy_model, value=value_model, reward=reward_model,
        policy_opt=steps.make_optimizer(cfg.optim, updates), value_opt=steps.make_optimizer(value_optim, updates),
        sampling=sampling)
    from_config = {f.name: getattr(cfg.ppo, f.name) for f in dataclasses.fields(ppo.PPOSettings)
                   if hasattr(cfg.ppo, f.name)}
    settings = ppo.PPOSettings(
        **from_config, reward_gain=float(norm.get("gain", 1.0)), reward_bias=float(norm.get("bias", 0.0)),
        value_gain=float(vnorm.get("gain", 1.0)), value_bias=float(vnorm.get("bias", 0.0)),
        accum=cfg.optim.grad_accum_steps, samples=min(SAMPLES, cfg.train.batch_size) if cfg.ppo.samples_every else 0)
    return models, settings


def iteration_shardings(cfg: Config, models: ppo.PPOModels, mesh) -> tuple[ppo.PPOState, ppo.Frozen]:
    """NamedShardings of the iteration's state and of its frozen params (the reference, the reward model and the
    LoRA bases); None where the frozen params are shared (`ppo.Frozen`)."""
    repl = sharding.replicated(mesh)
    policy_sh = state_shardings(models.policy, models.policy_opt, mesh)
    value_sh = state_shardings(models.value, models.value_opt, mesh)
    state_sh = ppo.PPOState(policy=policy_sh, value=value_sh, kl=KLController(repl), rng=repl,
                            ema=policy_sh.params if cfg.ppo.ema_decay else None)
    shares_reward_base = models.policy.lora is not None and not cfg.ppo.value_model
    return state_sh, ppo.Frozen(
        ref_params=reference_shardings(cfg.ppo.reference, models.policy, policy_sh.params, mesh),
        reward_params=param_shardings(models.reward, mesh), policy_base=frozen_shardings(models.policy, mesh),
        value_base=None if shares_reward_base else frozen_shardings(models.value, mesh))


def jit_iteration(models: ppo.PPOModels, settings: ppo.PPOSettings, state_sh: ppo.PPOState,
                  frozen_sh: ppo.Frozen, mesh, clock: LapClock | None = None):
    """`(state, frozen, prompt_ids, prompt_mask, ptx) -> (state, metrics)` jitted over the mesh: prompts (and
    ptx rows) split over the data-parallel axes, metrics replicated, the state donated; `clock` times the
    rollout and the update inside the program."""
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    runtime = ppo.Runtime(clock=clock, batch_sharding=batch_sh)
    return sharding.jit(lambda st, fr, ids, mask, ptx: ppo.iteration(st, fr, ids, mask, ptx, models=models,
                                                                     settings=settings, runtime=runtime), mesh,
                        in_shardings=(state_sh, frozen_sh, batch_sh, batch_sh, batch_sh),
                        out_shardings=(state_sh, repl), donate_argnums=0)


def _ptx_spec(cfg: Config):
    """The data section of the PPO-ptx dataset (checked to be an sft dataset), or None when ptx is off."""
    if not cfg.ppo.ptx_coef:
        return None
    spec = dataclasses.replace(cfg.data, name=cfg.ppo.ptx_dataset, pack=False)
    try:
        _, metadata = open_split(spec.dir, spec.name, spec.train_split)
    except UserError as e:
        raise UserError(f"ppo.ptx_dataset={spec.name!r}: {e}") from None
    if metadata["kind"] != "sft":
        raise UserError(f"ppo.ptx_dataset={spec.name!r} is a {metadata['kind']!r} dataset; PPO-ptx needs one of "
                        "kind 'sft'")
    return spec


def _ptx_batch(cfg: Config) -> int:
    return cfg.ppo.ptx_batch_size or cfg.train.batch_size


class PromptsAndPtx:
    """The prompt iterator and the PPO-ptx iterator as one: each batch holds both (ptx keys prefixed 'ptx_'),
    and the state of both is saved in checkpoints."""

    def __init__(self, prompts, ptx):
        self.prompts, self.ptx = prompts, ptx

    def __next__(self) -> dict:
        return {**next(self.prompts), **{f"ptx_{k}": v for k, v in next(self.ptx).items()}}

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(), "ptx": self.ptx.get_state()}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        self.ptx.set_state(state["ptx"])


def split_ptx(batch: dict) -> tuple[dict, dict | None]:
    """(the prompts' arrays, the PPO-ptx rows' arrays or None) of a batch of PromptsAndPtx or of prompts alone."""
    ptx = {k[len("ptx_"):]: v for k, v in batch.items() if k.startswith("ptx_") and k != "ptx_truncated"}
    return {k: v for k, v in batch.items() if not k.startswith("ptx_")}, ptx or None
