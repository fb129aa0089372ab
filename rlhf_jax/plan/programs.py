"""The training programs a dry run compiles: the sft / rm / dpo step (and dpo's pass scoring the data with its
reference first, when precomputed) and the whole PPO, GRPO or RLOO iteration, built exactly as their stages build
and jit them (`stages.train.Stage` and `training.state.jit_step`; `stages.ppo`'s builders), lowered on abstract
inputs (jax.ShapeDtypeStruct with the run's shardings, params from jax.eval_shape), so nothing is allocated."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.config import Config
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_params, without_adapters
from rlhf_jax.rl import dpo, ppo
from rlhf_jax.runtime import sharding
from rlhf_jax.runtime.clock import LapClock
from rlhf_jax.rl import group
from rlhf_jax.stages import grpo as group_stage, ppo as ppo_stage, train as trainers
from rlhf_jax.stages.policy_common import rollout_sampling
from rlhf_jax.training import steps
from rlhf_jax.training.state import (
    eval_batch_size, frozen_shardings, jit_step, micro_batch_size, param_shardings, split_trainable, stage_model,
    state_shardings, trained_model)

STAND_IN_STEPS = 1000  # schedule length when train.epochs needs the dataset's size (no shape depends on it)


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`: what a jitted function is lowered on."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(shapes: dict, mesh) -> dict:
    """{key: ((shape), dtype)} -> abstract arrays split over the data-parallel axes."""
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}


def sft_shapes(rows: int, cfg: Config) -> dict:
    T = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    return {"ids": ((rows, T), jnp.int32), "mask": ((rows, T), bool), "response_mask": ((rows, T), bool),
            "positions": ((rows, T), jnp.int32), "segment_ids": ((rows, T), jnp.int32)}


def train_batch_shapes(cfg: Config, responses: int = 0) -> dict:
    """The sft / rm / dpo training batch of the data pipeline's layout (`data/pipeline.py`); dpo's precomputed
    reference log-probs ride along (`stages/dpo_parts.py`)."""
    B, P, R, K = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, responses
    if cfg.stage == "sft":
        shapes = sft_shapes(B, cfg)
    else:
        shapes = {"prompt_ids": ((B, P), jnp.int32), "prompt_mask": ((B, P), bool),
                  "response_ids": ((B, K, R), jnp.int32), "response_mask": ((B, K, R), bool),
                  "pairs": ((B, K, K), jnp.int32), "example_index": ((B,), jnp.int32)}
        if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
            shapes["ref_logps"] = ((B, K), jnp.float32)
    return {**shapes, "truncated": ((B,), bool)}


def _reference_shapes(path: str, policy, trainable) -> dict:
    """Shapes of what a reference holds beyond the policy's frozen base (`stages.policy_common`): a LoRA
    policy's own reference, the initial values of what lora.also_train trains; any other, a whole model."""
    if policy.lora is not None and not path:
        return lora.also_trained(trainable, policy.lora)
    return jax.eval_shape(lambda: init_params(without_adapters(policy), jax.random.key(0)))


def _rng(mesh):
    return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))


class TrainingState(NamedTuple):
    """What the sft / rm / dpo stage places before its first step, abstract: its Stage, model, state and LoRA base
    (frozen; {} without LoRA), with their shardings."""

    stage: trainers.Stage
    model: Transformer
    state: object
    state_sh: object
    frozen: dict
    frozen_sh: dict
    trainable: dict  # the trained params' shapes


def training_state(cfg: Config, model_cfg: ModelConfig, mesh, total_steps: int | None = None) -> TrainingState:
    micro_batch_size(cfg, mesh)  # the stage's own batch / accumulation / mesh check
    model = trained_model(cfg, model_cfg, trainers.HEADS[cfg.stage])
    total = total_steps or cfg.train.steps or STAND_IN_STEPS
    optimizer = steps.make_optimizer(cfg.optim, total)
    stage = trainers.Stage(cfg, model, optimizer, steps.lr_schedule(cfg.optim, total))
    state_sh, frozen_sh = state_shardings(model, optimizer, mesh), frozen_shardings(model, mesh)
    trainable, frozen = split_trainable(model, jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
    state = abstract(jax.eval_shape(lambda p: steps.init_state(p, optimizer), trainable), state_sh)
    return TrainingState(stage, model, state, state_sh, abstract(frozen, frozen_sh), frozen_sh, trainable)


def _dpo_reference(cfg: Config, t: TrainingState, mesh) -> tuple:
    """(abstract reference params, their shardings) as dpo_parts.Reference.build places them: a LoRA policy's
    default reference is its base (the same buffers) with what lora.also_train trains as it was."""
    if t.model.lora is not None and not cfg.dpo.reference:
        extras_sh = lora.also_trained(param_shardings(t.model, mesh), t.model.lora)
        return (lora.join(abstract(_reference_shapes("", t.model, t.trainable), extras_sh), t.frozen),
                lora.join(extras_sh, t.frozen_sh))
    reference_sh = param_shardings(without_adapters(t.model), mesh)
    return abstract(_reference_shapes(cfg.dpo.reference, t.model, t.trainable), reference_sh), reference_sh


def train_step_program(cfg: Config, model_cfg: ModelConfig, mesh, responses: int = 0,
                       total_steps: int | None = None) -> jax.stages.Lowered:
    """The sft / rm / dpo step as trainers.train builds and jits it, lowered on abstract inputs (`responses`: K of
    rm and dpo); a LoRA model's base and dpo's live reference are frozen arguments (a LoRA policy's reference is
    its base: the same buffers, passed twice)."""
    t = training_state(cfg, model_cfg, mesh, total_steps)
    batch = abstract_batch(train_batch_shapes(cfg, responses), mesh)
    if cfg.stage != "dpo" or cfg.dpo.precompute_reference:
        return jit_step(t.stage.step, t.state_sh, mesh, t.frozen_sh).lower(t.state, batch, _rng(mesh), t.frozen)
    reference, reference_sh = _dpo_reference(cfg, t, mesh)
    return jit_step(t.stage.step, t.state_sh, mesh, t.frozen_sh, reference_sh).lower(
        t.state, batch, _rng(mesh), t.frozen, reference)


def reference_scoring_program(cfg: Config, model_cfg: ModelConfig, mesh, responses: int) -> tuple:
    """dpo.precompute_reference's pass over the data before training, as dpo_parts.Reference.build jits it (the
    reference's summed log-probs of `eval_batch_size` prompts x K responses), lowered on abstract inputs; and the
    bytes per device that stay placed while it runs: the policy's training state, and its LoRA base unless that
    base is the reference (the pass's own arguments hold it then). Returns (lowered, resident bytes, rows)."""
    t = training_state(cfg, model_cfg, mesh)
    reference, _ = _dpo_reference(cfg, t, mesh)
    rows, K, P, R = eval_batch_size(cfg, mesh), responses, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    batch = abstract_batch({"prompt_ids": ((rows, P), jnp.int32), "prompt_mask": ((rows, P), bool),
                            "response_ids": ((rows, K, R), jnp.int32), "response_mask": ((rows, K, R), bool)}, mesh)
    score = sharding.jit(functools.partial(dpo.response_logprobs, without_adapters(t.model)), mesh,
                         out_shardings=sharding.replicated(mesh))
    base_is_reference = t.model.lora is not None and not cfg.dpo.reference
    resident = device_bytes(t.state) + (0 if base_is_reference else device_bytes(t.frozen))
    return score.lower(reference, batch), resident, rows


def device_bytes(tree) -> int:
    """Bytes of one device's shards of abstract arrays (the largest shard where a split is uneven)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def ppo_iteration_program(cfg: Config, policy_cfg: ModelConfig, mesh, value_cfg: ModelConfig | None = None,
                          reward_cfg: ModelConfig | None = None, total_steps: int | None = None) -> jax.stages.Lowered:
    """One PPO iteration as ppo_stage.train_ppo builds and jits it, lowered on abstract inputs; the frozen
    reference and reward params are arguments. The value and reward models default to the policy's
    architecture with a scalar head."""
    ppo_stage.check_sizes(cfg, mesh)  # the stage's own check
    reward_cfg = reward_cfg or policy_cfg
    policy, value = trained_model(cfg, policy_cfg, "lm"), trained_model(cfg, value_cfg or reward_cfg, "scalar")
    reward = stage_model(cfg, reward_cfg, "scalar")
    total = total_steps or cfg.train.steps or STAND_IN_STEPS
    models, settings = ppo_stage.build_models(cfg, policy, value, reward, total,
                                              rollout_sampling(cfg, policy_cfg.eos_token_ids or (0,)))
    state_sh, frozen_sh = ppo_stage.iteration_shardings(cfg, models, mesh)
    key = jax.random.key(0)
    shapes = lambda model: jax.eval_shape(lambda: init_params(model, key))
    (policy_params, policy_base), (value_params, value_base) = (split_trainable(m, shapes(m)) for m in (policy, value))
    state = abstract(jax.eval_shape(lambda p, v: ppo.init_state(p, v, models, settings, jax.random.PRNGKey(0)),
                                    policy_params, value_params), state_sh)
    frozen = ppo.Frozen(
        ref_params=abstract(_reference_shapes(cfg.ppo.reference, policy, policy_params), frozen_sh.ref_params),
        reward_params=abstract(shapes(reward), frozen_sh.reward_params),
        policy_base=abstract(policy_base, frozen_sh.policy_base),
        value_base=None if frozen_sh.value_base is None else abstract(value_base, frozen_sh.value_base))
    B, P = cfg.train.batch_size, cfg.data.max_prompt_tokens
    prompts = abstract_batch({"ids": ((B, P), jnp.int32), "mask": ((B, P), bool)}, mesh)
    ptx = abstract_batch(sft_shapes(cfg.ppo.ptx_batch_size or B, cfg), mesh) if cfg.ppo.ptx_coef else None
    program = ppo_stage.jit_iteration(models, settings, state_sh, frozen_sh, mesh, LapClock())  # as the stage runs it
    return program.lower(state, frozen, prompts["ids"], prompts["mask"], ptx)


def group_iteration_program(cfg: Config, policy_cfg: ModelConfig, mesh, reward_cfg: ModelConfig | None = None,
                            total_steps: int | None = None) -> jax.stages.Lowered:
    """One GRPO / RLOO iteration as group_stage.train_group builds and jits it, lowered on abstract inputs: the
    reference (when the KL coefficient is > 0) and the reward model (None with a reward function, whose host
    callback is a stand-in: lowering never calls it) are frozen arguments; the B prompts are replicated."""
    group_stage.check_sizes(cfg, mesh)  # the stage's own check
    policy = trained_model(cfg, policy_cfg, "lm")
    reward = stage_model(cfg, reward_cfg, "scalar") if reward_cfg is not None else None
    total = total_steps or cfg.train.steps or STAND_IN_STEPS
    models, settings = group_stage.build_models(cfg, policy, reward, total,
                                                rollout_sampling(cfg, policy_cfg.eos_token_ids or (0,)))
    state_sh, frozen_sh = group_stage.iteration_shardings(cfg, models, mesh)
    key = jax.random.key(0)
    shapes = lambda model: jax.eval_shape(lambda: init_params(model, key))
    policy_params, policy_base = split_trainable(policy, shapes(policy))
    state = abstract(jax.eval_shape(lambda p: group.init_state(p, models, jax.random.PRNGKey(0)), policy_params),
                     state_sh)
    section = getattr(cfg, cfg.stage)
    frozen = group.Frozen(
        ref_params=(None if frozen_sh.ref_params is None else
                    abstract(_reference_shapes(section.reference, policy, policy_params), frozen_sh.ref_params)),
        reward_params=None if reward is None else abstract(shapes(reward), frozen_sh.reward_params),
        policy_base=abstract(policy_base, frozen_sh.policy_base))
    B, P = cfg.train.batch_size, cfg.data.max_prompt_tokens
    prompt = lambda dtype: jax.ShapeDtypeStruct((B, P), dtype, sharding=sharding.replicated(mesh))
    stand_in = None if reward is not None else (lambda *rows: jnp.zeros(len(rows[2]), jnp.float32))
    program = group_stage.jit_iteration(models, settings, state_sh, frozen_sh, mesh, LapClock(), stand_in)
    return program.lower(state, frozen, prompt(jnp.int32), prompt(bool))
