"""One PPO iteration of InstructGPT's stage 3 as one pure function, to be jitted over the mesh with the state
donated: rollout with the scanned sampler, old / reference log-probs, values and reward-model scores on the same
tokens, per-token KL rewards, GAE, then `epochs` x `minibatches` clipped policy and value updates as nested
`lax.scan`s with a fresh permutation per epoch, and the KL controller's update.

Layout: B prompts of P left-padded tokens, N new tokens; every response tensor is (B, N) with mask_BN True up to
and including the first EOS. values_BN[t] is the value of the state before response token t is drawn, read at
the same position as the logits that predict it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import ppo_losses as L
from rlhf_jax.clock import LapClock
from rlhf_jax.config import PPOSection
from rlhf_jax.losses import last_token_values, token_logprobs
from rlhf_jax.model import Transformer, positions_from_mask
from rlhf_jax.sampling import SamplingParams, is_eos, response_logits, sample
from rlhf_jax.steps import TrainState, accumulate, micro_batches, sft_sums


@flax.struct.dataclass
class PPOState:
    """Everything an iteration changes, checkpointed together: both models with their optimizer states, the KL
    controller, the PRNG key of the next iteration and the EMA of the policy weights (None when off)."""

    policy: TrainState
    value: TrainState
    kl: L.KLController
    rng: jax.Array
    ema: Any = None


class Frozen(NamedTuple):
    """Parameters an iteration reads and never changes: the reference policy and the reward model."""

    ref_params: Any
    reward_params: Any


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The static parts: the models (the reference shares the policy's), optimizers and settings."""

    policy: Transformer
    value: Transformer
    reward: Transformer
    policy_opt: optax.GradientTransformation
    value_opt: optax.GradientTransformation
    sampling: SamplingParams
    ppo: PPOSection
    reward_gain: float = 1.0  # the reward model's normalisation: score = gain * raw + bias
    reward_bias: float = 0.0
    samples: int = 0  # rollout rows returned under metrics["samples"] for samples.jsonl
    accum: int = 1  # micro-batches per minibatch (gradient accumulation, optim.grad_accum_steps)
    clock: LapClock | None = None  # times the rollout and the update inside the program (metrics rollout_s, ...)
    # A batch's NamedSharding over the data-parallel axes: rows gathered for a (micro-)batch are put back on it,
    # since a gather of permuted rows would otherwise leave the whole minibatch on every device (None: unsharded).
    batch_sharding: Any = None

    def on_batch_axes(self, tree):
        """`tree`'s leading (row) dimension split over the data-parallel devices, like the batch it came from."""
        if self.batch_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding), tree)


class Rollout(NamedTuple):
    prompt_ids_BP: jax.Array
    prompt_mask_BP: jax.Array
    tokens_BN: jax.Array
    mask_BN: jax.Array
    old_logprobs_BN: jax.Array
    old_values_BN: jax.Array
    advantages_BN: jax.Array
    returns_BN: jax.Array


def init_state(policy_params, value_params, models: PPOModels, rng: jax.Array) -> PPOState:
    """The first state. The iteration donates it, so `Frozen` must hold copies, not these same arrays."""
    ema = jax.tree.map(jnp.copy, policy_params) if models.ppo.ema_decay else None
    return PPOState(policy=TrainState(jnp.zeros((), jnp.int32), policy_params, models.policy_opt.init(policy_params)),
                    value=TrainState(jnp.zeros((), jnp.int32), value_params, models.value_opt.init(value_params)),
                    kl=L.KLController.create(models.ppo.kl_coef), rng=rng, ema=ema)


def _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN):
    ids_BT = jnp.concatenate([prompt_ids_BP, tokens_BN], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP.astype(bool), mask_BN.astype(bool)], axis=1)
    return ids_BT, mask_BT, positions_from_mask(mask_BT)


def response_values(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN) -> jax.Array:
    """values_BN: the value head at the positions whose logits predict each response token."""
    ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    values_BT, _ = model.apply({"params": params}, ids_BT, positions_BT, mask_BT)
    P = prompt_ids_BP.shape[1]
    return values_BT[:, P - 1:-1]


def scores(models: PPOModels, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN) -> jax.Array:
    """Normalised reward-model scores at each sequence's last real token."""
    return reward_scores(models.reward, params, models.reward_gain, models.reward_bias, prompt_ids_BP,
                         prompt_mask_BP, tokens_BN, mask_BN)


def reward_scores(reward: Transformer, params, gain: float, bias: float, prompt_ids_BP, prompt_mask_BP, tokens_BN,
                  mask_BN) -> jax.Array:
    """gain * (the scalar head at each [prompt | response]'s last real token) + bias."""
    ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    values_BT, _ = reward.apply({"params": params}, ids_BT, positions_BT, mask_BT)
    return gain * last_token_values(values_BT, mask_BT) + bias


def _logprobs(logits_BNV, tokens_BN, mask_BN, *_):
    return jnp.where(mask_BN, token_logprobs(logits_BNV, tokens_BN), 0.0)


def minibatch_orders(rng, batch_size: int, models: PPOModels) -> jax.Array:
    """orders_EMMb: the rows of each of the M minibatches of each of the E epochs, a fresh permutation per epoch."""
    p = models.ppo
    keys = jax.random.split(rng, p.epochs)
    return jax.vmap(lambda key: jax.random.permutation(key, batch_size).reshape(p.minibatches, -1))(keys)


def micro_batch_rows(order_MMb, accum: int) -> jax.Array:
    """rows_(M*A)m: the rows of every micro-batch, minibatch by minibatch, split as the update splits them."""
    return jax.vmap(lambda rows: micro_batches(rows, accum))(order_MMb).reshape(-1, order_MMb.shape[1] // accum)


def rollout(state: PPOState, frozen: Frozen, prompt_ids_BP, prompt_mask_BP, rng, models: PPOModels,
            first_order_MMb=None):
    """Samples responses and prepares everything the update needs; returns (rollout, KL per sequence, stats).
    `first_order_MMb` is the first epoch's minibatch rows (default: rows in order)."""
    p, c = models.ppo, models.sampling
    dtype = models.policy.dtype
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # once, not per decode step
    sampled = sample(models.policy, cast(state.policy.params), prompt_ids_BP, prompt_mask_BP, rng, c)
    tokens_BN, mask_BN = sampled.tokens_BN, sampled.mask_BN
    args = (prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    # Every teacher-forced pass runs micro-batch by micro-batch (the update's own split, so it fits where the
    # update fits). The old log-probs come from the training forward itself on the first epoch's micro-batches,
    # exactly as the update runs them, so the first minibatch's ratio is exactly 1. In float32 the sampler's
    # own log-probs agree with it to 1e-5 (tested); in bf16 the decode rounds differently.
    B = tokens_BN.shape[0]
    order_MMb = first_order_MMb if first_order_MMb is not None else jnp.arange(B).reshape(p.minibatches, -1)
    rows_Km = micro_batch_rows(order_MMb, models.accum)

    def micro_batch_passes(rows):
        mb = models.on_batch_axes([x[rows] for x in args])
        logprobs = lambda params: _logprobs(response_logits(models.policy, params, *mb, c.temperature), *mb[2:])
        return (logprobs(state.policy.params), logprobs(frozen.ref_params),
                jnp.where(mb[3], response_values(models.value, state.value.params, *mb), 0.0),
                scores(models, frozen.reward_params, *mb))

    unsorted = jax.lax.map(micro_batch_passes, rows_Km)
    in_rows = lambda x: models.on_batch_axes(jnp.zeros((B, *x.shape[2:]), x.dtype).at[rows_Km.reshape(-1)].set(
        x.reshape(B, *x.shape[2:])))
    old_logprobs_BN, ref_logprobs_BN, old_values_BN, raw_scores_B = (in_rows(x) for x in unsorted)
    ended_B = jnp.any(mask_BN & is_eos(tokens_BN, c.eos_ids), axis=1)
    scores_B = L.score_with_eos_penalty(raw_scores_B, ended_B, p.no_eos_penalty)

    kl_BN = L.kl_per_token(old_logprobs_BN, ref_logprobs_BN, mask_BN, p.kl_estimator)
    rewards_BN = L.token_rewards(scores_B, kl_BN, mask_BN, state.kl.beta)
    if p.whiten_rewards:
        rewards_BN = L.whiten(rewards_BN, mask_BN, shift_mean=False)
    advantages_BN, returns_BN = L.gae(rewards_BN, old_values_BN, mask_BN, p.gamma, p.lam)
    advantages_BN = L.whiten(advantages_BN, mask_BN)  # returns were taken before whitening
    batch = Rollout(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN, old_logprobs_BN, old_values_BN,
                    advantages_BN, returns_BN)
    kl_B = kl_BN.sum(1)
    stats = {"score_mean": scores_B.mean(), "score_std": scores_B.std(), "kl": kl_B.mean(),
             "response_length": mask_BN.sum(1).mean(), "eos_rate": ended_B.mean(),
             "value_explained_var": L.explained_variance(old_values_BN, returns_BN, mask_BN)}
    if models.samples:
        n = models.samples
        stats["samples"] = {"prompt_ids": prompt_ids_BP[:n], "prompt_mask": prompt_mask_BP[:n],
                            "tokens": tokens_BN[:n], "mask": mask_BN[:n], "score": scores_B[:n], "kl": kl_B[:n]}
    return batch, kl_B, stats


def ptx_target_tokens(ptx: dict) -> jax.Array:
    """The number of next-token targets of a pretraining (sft) batch: every real token after the first."""
    same_BT = ptx["segment_ids"][:, 1:] == ptx["segment_ids"][:, :-1]
    return jnp.sum(ptx["mask"][:, 1:] * same_BT, dtype=jnp.float32)


def ptx_loss(model: Transformer, params, ptx: dict, denominator=None) -> jax.Array:
    """PPO-ptx: the mean next-token NLL over every real token of a batch of the pretraining (sft) dataset
    (or its sum / denominator, to add up exactly over micro-batches)."""
    sums = sft_sums(model, params, ptx, ptx["mask"])
    return sums["nll_sum"] / (jnp.maximum(sums["target_tokens"], 1.0) if denominator is None else denominator)


def _minibatch_loss(params, micro, models: PPOModels, tokens, ptx_tokens):
    """The PPO objective of one micro-batch, its means taken over the whole minibatch's `tokens` (and
    `ptx_tokens`) so that micro-batch losses and gradients add up to the minibatch's exactly."""
    (policy_params, value_params), (mb, ptx) = params, micro
    p, temperature = models.ppo, models.sampling.temperature
    args = (mb.prompt_ids_BP, mb.prompt_mask_BP, mb.tokens_BN, mb.mask_BN)
    logits_BNV = response_logits(models.policy, policy_params, *args, temperature)
    logprobs_BN = _logprobs(logits_BNV, mb.tokens_BN, mb.mask_BN)
    pg_loss, pg_stats = L.policy_loss(logprobs_BN, mb.old_logprobs_BN, mb.advantages_BN, mb.mask_BN, p.clip_ratio,
                                      tokens)
    entropy = L.entropy_from_logits(logits_BNV, mb.mask_BN, tokens)
    values_BN = response_values(models.value, value_params, *args)
    vf_loss, vf_stats = L.value_loss(values_BN, mb.old_values_BN, mb.returns_BN, mb.mask_BN, p.clip_value, tokens)
    loss = pg_loss - p.entropy_coef * entropy + p.vf_coef * vf_loss
    lm_loss = jnp.zeros((), jnp.float32)
    if ptx is not None:  # InstructGPT's gamma x pretraining loss, in the same gradient as the PPO objective
        lm_loss = ptx_loss(models.policy, policy_params, ptx, ptx_tokens)
        loss = loss + p.ptx_coef * lm_loss
    return loss, {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, "ptx_loss": lm_loss,
                  **pg_stats, **vf_stats}


def _combine_micro_batches(stats_A: dict) -> dict:
    """Per-micro-batch stats (leading axis) to the minibatch's: means were taken over the whole minibatch, so
    they add; the ratio extremes combine by max / min."""
    pick = {"ratio_max": jnp.max, "ratio_min": jnp.min}
    return {k: pick.get(k, jnp.sum)(v, axis=0) for k, v in stats_A.items()}


def _apply(train: TrainState, grads, optimizer) -> TrainState:
    updates, opt_state = optimizer.update(grads, train.opt_state, train.params)
    return TrainState(train.step + 1, optax.apply_updates(train.params, updates), opt_state)


def update(state: PPOState, batch: Rollout, orders_EMMb, models: PPOModels, ptx: dict | None = None):
    """`epochs` x `minibatches` optimizer steps of policy and value over the given minibatch rows, minibatch m
    adding the LM loss of the m-th slice of the `ptx` batch; returns (state, per-step stats)."""
    M = models.ppo.minibatches
    ptx_slices = None if ptx is None else jax.tree.map(lambda x: x.reshape(M, -1, *x.shape[1:]), ptx)

    def epoch(carry, order):
        def minibatch(carry, xs):
            rows, ptx_mb = xs
            policy, value = carry
            mb = models.on_batch_axes(jax.tree.map(lambda x: x[rows], batch))
            ptx_mb = models.on_batch_axes(ptx_mb)
            tokens = jnp.maximum(jnp.sum(mb.mask_BN, dtype=jnp.float32), 1.0)
            ptx_tokens = None if ptx_mb is None else jnp.maximum(ptx_target_tokens(ptx_mb), 1.0)
            loss = functools.partial(_minibatch_loss, models=models, tokens=tokens, ptx_tokens=ptx_tokens)
            (policy_grads, value_grads), stats = accumulate(loss, (policy.params, value.params), (mb, ptx_mb),
                                                            models.accum, _combine_micro_batches)
            return (_apply(policy, policy_grads, models.policy_opt),
                    _apply(value, value_grads, models.value_opt)), stats

        return jax.lax.scan(minibatch, carry, (order, ptx_slices))

    (policy, value), stats = jax.lax.scan(epoch, (state.policy, state.value), orders_EMMb)
    return state.replace(policy=policy, value=value), jax.tree.map(lambda x: x.reshape(-1), stats)


def iteration(state: PPOState, frozen: Frozen, prompt_ids_BP, prompt_mask_BP, ptx: dict | None = None, *,
              models: PPOModels):
    """One whole PPO iteration (rollout, scoring, advantages, every update epoch, the KL controller): pure (but
    for `models.clock`'s laps), for one jit over the mesh with `state` donated. `ptx` is a batch of the sft
    layout for PPO-ptx (None: off). Returns (state, metrics)."""
    lap = models.clock.lap if models.clock is not None else lambda values, gate=True: (None, values)
    host_wait_s, (prompt_ids_BP, prompt_mask_BP) = lap((prompt_ids_BP, prompt_mask_BP))
    rng, sample_rng, update_rng = jax.random.split(state.rng, 3)
    orders_EMMb = minibatch_orders(update_rng, prompt_ids_BP.shape[0], models)
    rollout_s, (batch, kl_B, rollout_stats) = lap(rollout(state, frozen, prompt_ids_BP, prompt_mask_BP, sample_rng,
                                                          models, orders_EMMb[0]))
    beta = state.kl.beta
    state, steps = update(state, batch, orders_EMMb, models, ptx)
    update_s, steps = lap(steps, gate=False)  # the per-step stats: complete with the last minibatch's gradients
    p = models.ppo
    kl = state.kl.update(kl_B.mean(), p.kl_target or None, p.kl_horizon, kl_B.shape[0])
    metrics = {**rollout_stats, "beta": beta,
               **{k: steps[k].mean() for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac",
                                               "value_clip_frac", "ptx_loss")},
               "ratio_max": steps["ratio_max"].max(), "ratio_min": steps["ratio_min"].min(),
               # the first minibatch of the first epoch sees the rollout's own policy: its ratio is exactly 1
               "first_ratio_max": steps["ratio_max"][0], "first_ratio_min": steps["ratio_min"][0],
               "first_clip_frac": steps["clip_frac"][0]}
    if models.clock is not None:  # host_wait_s: from the previous iteration's end (host loop work, compilation)
        metrics.update(rollout_s=rollout_s, update_s=update_s, host_wait_s=host_wait_s)
    if state.ema is not None:  # InstructGPT's EMA of the policy weights, once per iteration
        d = p.ema_decay
        state = state.replace(ema=jax.tree.map(lambda e, x: d * e + (1 - d) * x, state.ema, state.policy.params))
    return state.replace(kl=kl, rng=rng), metrics
