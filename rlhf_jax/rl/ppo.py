"""One PPO iteration of InstructGPT's stage 3 as one pure function, jitted over the mesh with the state donated.

`iteration` reads as the algorithm: sample responses; score and teacher-force them (old and reference
log-probs, values, reward-model scores); per-token rewards; GAE; `epochs` x `minibatches` clipped updates; the
KL controller. Each step is a named function below it, next to its math (`ppo_math`); the speed-ups (the
update's first forward shared with the rollout, micro-batching, the phase clock) are in the last section.

Shapes: B prompts of P left-padded tokens, N new tokens, V vocabulary; E epochs, M minibatches of Mb rows, A
micro-batches of m rows. Every response tensor is (B, N) with mask_BN True up to and including the first EOS.
values_BN[t] is the value of the state before response token t is drawn, read at the same position as the
logits that predict it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models.sampling import SamplingParams, is_eos, sample
from rlhf_jax.models.transformer import Transformer, without_adapters
from rlhf_jax.rl import ppo_math as L
from rlhf_jax.rl.scoring import response_token_stats, response_values, reward_scores
from rlhf_jax.runtime.clock import LapClock
from rlhf_jax.training.steps import TrainState, micro_batches, sft_sums, whole_params


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """The numbers of an iteration (the ppo stage fills them from the config's `ppo` section)."""

    epochs: int = 1
    minibatches: int = 1
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl_coef: float = 0.02  # beta; the initial beta of the adaptive controller
    kl_target: float = 0.0  # > 0: the adaptive controller's target (nats per sequence)
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    no_eos_penalty: float | None = None  # the score of a response that never ended, in normalised units
    ptx_coef: float = 0.0
    ema_decay: float = 0.0
    reward_gain: float = 1.0  # the reward model's normalisation: score = gain * head + bias
    reward_bias: float = 0.0
    # The value model's outputs in the same units: initialised from the reward model, V = gain * head + bias
    # predicts normalised returns from the start (its raw head would be off by the RM's arbitrary offset).
    value_gain: float = 1.0
    value_bias: float = 0.0
    accum: int = 1  # micro-batches per minibatch (gradient accumulation)
    samples: int = 0  # rollout rows returned under metrics["samples"] (for samples.jsonl)


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The models (the reference shares the policy's), their optimizers and the sampler's settings."""

    policy: Transformer
    value: Transformer
    reward: Transformer
    policy_opt: optax.GradientTransformation
    value_opt: optax.GradientTransformation
    sampling: SamplingParams


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the program runs, not what it computes: the lap clock (metrics rollout_s, update_s, host_wait_s) and
    the batch's NamedSharding over the data-parallel axes. Rows gathered for a (micro-)batch are put back on it,
    since a gather of permuted rows would otherwise leave the whole minibatch on every device."""

    clock: LapClock | None = None
    batch_sharding: Any = None

    def lap(self, values, gate: bool = True):
        return self.clock.lap(values, gate) if self.clock is not None else (None, values)

    def on_batch_axes(self, tree):
        """`tree`'s leading (row) dimension split over the data-parallel devices, like the batch it came from."""
        if self.batch_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding), tree)

    def everywhere(self, tree):
        """`tree` whole on every device: what a host callback reads (XLA gathers rows split over the mesh to one
        device only by replicating them first, and warns at every compile that it had to)."""
        if self.batch_sharding is None:
            return tree
        whole = jax.sharding.NamedSharding(self.batch_sharding.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), tree)


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
    """Parameters an iteration reads and never changes: the reference policy and the reward model, and with LoRA
    the policy's and the value model's frozen bases ({} in full fine-tuning). `ref_params` is what the reference
    holds beyond the policy's base: a LoRA policy's reference is its own base (the same buffers) with the initial
    values of what lora.also_train trains ({} without); a value model initialised from the reward model shares
    its base (`value_base` None: the reward model's params but its head)."""

    ref_params: Any
    reward_params: Any
    policy_base: Any = {}
    value_base: Any = {}

    def reference(self):
        return whole_params(self.ref_params, self.policy_base)

    def bases(self) -> tuple:
        """(policy base, value base) to join with what trains (`steps.whole_params`)."""
        value_base = self.value_base
        if value_base is None:
            value_base = {k: v for k, v in self.reward_params.items() if k != "score"}
        return self.policy_base, value_base


class Rollout(NamedTuple):
    """What the update trains on."""

    prompt_ids_BP: jax.Array
    prompt_mask_BP: jax.Array
    tokens_BN: jax.Array
    mask_BN: jax.Array
    old_logprobs_BN: jax.Array
    old_values_BN: jax.Array
    advantages_BN: jax.Array
    returns_BN: jax.Array


def init_state(policy_params, value_params, models: PPOModels, settings: PPOSettings, rng: jax.Array) -> PPOState:
    """The first state. The iteration donates it, so `Frozen` must hold copies, not these same arrays."""
    ema = jax.tree.map(jnp.copy, policy_params) if settings.ema_decay else None
    return PPOState(policy=TrainState(jnp.zeros((), jnp.int32), policy_params, models.policy_opt.init(policy_params)),
                    value=TrainState(jnp.zeros((), jnp.int32), value_params, models.value_opt.init(value_params)),
                    kl=L.KLController.create(settings.kl_coef), rng=rng, ema=ema)


# --------------------------------------------------------------------------------------------- the iteration


def iteration(state: PPOState, frozen: Frozen, prompt_ids_BP, prompt_mask_BP, ptx: dict | None = None, *,
              models: PPOModels, settings: PPOSettings, runtime: Runtime = Runtime()):
    """One whole PPO iteration, pure (but for the runtime's lap clock), for one jit over the mesh with `state`
    donated. `ptx` is a batch of the sft layout for PPO-ptx (None: off). Returns (state, metrics)."""
    host_wait_s, (prompt_ids_BP, prompt_mask_BP) = runtime.lap((prompt_ids_BP, prompt_mask_BP))
    rng, sample_rng, order_rng = jax.random.split(state.rng, 3)
    orders_EMMb = minibatch_orders(order_rng, prompt_ids_BP.shape[0], settings)
    # 1-4: sample; score and teacher-force; per-token rewards; GAE
    batch, kl_B, stats, first = rollout(state, frozen, prompt_ids_BP, prompt_mask_BP, sample_rng, models, settings,
                                        runtime, orders_EMMb[0])
    rollout_s, (batch, kl_B, stats) = runtime.lap((batch, kl_B, stats))
    # 5: epochs x minibatches of clipped policy and value updates
    beta = state.kl.beta
    state, steps = update(state, batch, orders_EMMb, models, settings, runtime, ptx, first, frozen.bases())
    update_s, steps = runtime.lap(steps, gate=False)  # complete with the last step's gradient norms
    # 6: the KL controller (fixed beta unless kl_target), then InstructGPT's EMA of the policy weights
    kl = state.kl.update(kl_B.mean(), settings.kl_target or None, settings.kl_horizon, kl_B.shape[0])
    if state.ema is not None:
        d = settings.ema_decay
        state = state.replace(ema=jax.tree.map(lambda e, x: d * e + (1 - d) * x, state.ema, state.policy.params))
    metrics = {**stats, "beta": beta, **update_metrics(steps)}
    if runtime.clock is not None:  # host_wait_s: from the previous iteration's end (host loop work, compilation)
        metrics.update(rollout_s=rollout_s, update_s=update_s, host_wait_s=host_wait_s)
    return state.replace(kl=kl, rng=rng), metrics


def rollout(state: PPOState, frozen: Frozen, prompt_ids_BP, prompt_mask_BP, rng, models: PPOModels,
            settings: PPOSettings, runtime: Runtime = Runtime(), first_order_MMb=None):
    """Steps 1-4: everything the update needs. Returns (rollout, KL per sequence, stats, FirstForward);
    `first_order_MMb` is the first epoch's minibatch rows (default: rows in order)."""
    sampled = sample_responses(whole_params(state.policy.params, frozen.policy_base), prompt_ids_BP, prompt_mask_BP,
                               rng, models)
    responses = (prompt_ids_BP, prompt_mask_BP, sampled.tokens_BN, sampled.mask_BN)
    forced, first = teacher_force(state, frozen, responses, models, settings, runtime, first_order_MMb)
    mask_BN = sampled.mask_BN
    ended_B = jnp.any(mask_BN & is_eos(sampled.tokens_BN, models.sampling.eos_ids), axis=1)
    scores_B = L.score_with_eos_penalty(forced.scores_B, ended_B, settings.no_eos_penalty)  # normalised units
    kl_BN = L.kl_per_token(forced.old_logprobs_BN, forced.ref_logprobs_BN, mask_BN, settings.kl_estimator)
    rewards_BN = token_rewards(scores_B, kl_BN, mask_BN, state.kl.beta, settings)
    advantages_BN, returns_BN = advantages_and_returns(rewards_BN, forced.old_values_BN, mask_BN, settings)
    batch = Rollout(*responses, forced.old_logprobs_BN, forced.old_values_BN, advantages_BN, returns_BN)
    kl_B = kl_BN.sum(1)
    stats = rollout_metrics(batch, sampled.logprobs_BN, scores_B, kl_B, ended_B, settings)
    return batch, kl_B, stats, first


# --------------------------------------------------------------------------------------------- the steps


def sample_responses(policy_params, prompt_ids_BP, prompt_mask_BP, rng, models: PPOModels, group: int = 1):
    """1. N new tokens per prompt from the current policy at the sampling temperature (scanned decode); `group`:
    as `sample`'s, rows in runs sharing a prompt whose prefill runs once."""
    dtype = models.policy.dtype
    params = jax.tree.map(lambda x: x.astype(dtype), policy_params)  # once, not per decode step
    return sample(models.policy, params, prompt_ids_BP, prompt_mask_BP, rng, models.sampling, group)


class Forced(NamedTuple):
    """Step 2's outputs, row by row."""

    old_logprobs_BN: jax.Array
    old_values_BN: jax.Array
    ref_logprobs_BN: jax.Array
    scores_B: jax.Array  # the reward model's normalised score (gain * head + bias) at the last real token


def teacher_force(state: PPOState, frozen: Frozen, responses, models: PPOModels, settings: PPOSettings,
                  runtime: Runtime, first_order_MMb=None) -> tuple[Forced, "FirstForward"]:
    """2. The sampled tokens through the policy (old log-probs), the value model, the reference (reference
    log-probs) and the reward model (scores). The old log-probs and values come from the training forward
    itself, micro-batch by micro-batch as the first epoch's update runs them, so the first minibatch's ratio is
    exactly 1; the first micro-batch's forward is the update's own (`FirstForward`), not run twice. In float32
    the sampler's own log-probs agree with it to 1e-5 (tested); in bf16 the decode rounds differently."""
    B = responses[0].shape[0]
    if first_order_MMb is None:
        first_order_MMb = jnp.arange(B).reshape(settings.minibatches, -1)
    rows_Km = micro_batch_rows(first_order_MMb, settings.accum)
    gather = lambda rows: runtime.on_batch_axes([x[rows] for x in responses])
    params, bases = (state.policy.params, state.value.params), frozen.bases()

    def frozen_passes(rows):
        mb = gather(rows)
        ref = response_token_stats(without_adapters(models.policy), frozen.reference(), *mb,
                                   models.sampling.temperature, vocab=models.sampling.vocab)
        return ref.logprobs_BN, scores(models, settings, frozen.reward_params, *mb)

    def trained_passes(rows):
        mb = gather(rows)
        return _old_logprobs_and_values(_forward(params, mb, models, settings, bases), mb)

    # Every pass runs micro-batch by micro-batch (the update's own split: it fits where the update fits).
    frozen_K, trained_rest = jax.lax.map(frozen_passes, rows_Km), jax.lax.map(trained_passes, rows_Km[1:])
    # The first micro-batch's forward keeps its activations for the update's backward: it runs last, so that they
    # live beside no other pass's.
    first_mb, frozen_K, trained_rest = jax.lax.optimization_barrier((gather(rows_Km[0]), frozen_K, trained_rest))
    outputs, pullback = jax.vjp(lambda params: _forward(params, first_mb, models, settings, bases), params)
    trained = jax.tree.map(lambda a, rest: jnp.concatenate([a[None], rest]),
                           _old_logprobs_and_values(outputs, first_mb), trained_rest)
    in_rows = lambda x: runtime.on_batch_axes(jnp.zeros((B, *x.shape[2:]), x.dtype).at[rows_Km.reshape(-1)].set(
        x.reshape(B, *x.shape[2:])))
    return Forced(*(in_rows(x) for x in (*trained, *frozen_K))), FirstForward(outputs, pullback)


def token_rewards(scores_B, kl_BN, mask_BN, beta, settings: PPOSettings) -> jax.Array:
    """3. rewards_BN: -beta * KL on every sampled token, plus the score on the last real one; optionally scaled
    to unit variance over real tokens with the mean kept (lm-human-preferences)."""
    rewards_BN = L.token_rewards(scores_B, kl_BN, mask_BN, beta)
    return L.whiten(rewards_BN, mask_BN, shift_mean=False) if settings.whiten_rewards else rewards_BN


def advantages_and_returns(rewards_BN, values_BN, mask_BN, settings: PPOSettings):
    """4. GAE (a reverse scan, value 0 after the last token); returns = advantages + values, taken before the
    advantages are whitened."""
    advantages_BN, returns_BN = L.gae(rewards_BN, values_BN, mask_BN, settings.gamma, settings.lam)
    return L.whiten(advantages_BN, mask_BN), returns_BN


def minibatch_orders(rng, batch_size: int, settings: PPOSettings) -> jax.Array:
    """orders_EMMb: the rows of each of the M minibatches of each of the E epochs, a fresh permutation per epoch."""
    keys = jax.random.split(rng, settings.epochs)
    return jax.vmap(lambda key: jax.random.permutation(key, batch_size).reshape(settings.minibatches, -1))(keys)


def update(state: PPOState, batch: Rollout, orders_EMMb, models: PPOModels, settings: PPOSettings,
           runtime: Runtime = Runtime(), ptx: dict | None = None, first: FirstForward | None = None,
           bases: tuple = ({}, {})):
    """5. `epochs` x `minibatches` optimizer steps of policy and value over the given minibatch rows (one flat
    scan), minibatch m adding the LM loss of the m-th slice of the `ptx` batch; `first` is the rollout's forward
    of the first step's first micro-batch; `bases`: the frozen (policy, value) bases of LoRA models. Returns
    (state, per-step stats)."""
    E, M, _ = orders_EMMb.shape
    rows_SAm = jax.vmap(lambda rows: micro_batches(rows, settings.accum))(orders_EMMb.reshape(E * M, -1))
    ptx_slices = None if ptx is None else jax.tree.map(lambda x: x.reshape(M, -1, *x.shape[1:]), ptx)

    def step(carry, xs, first=None):
        rows_Am, m = xs
        ptx_mb = None if ptx_slices is None else jax.tree.map(lambda x: x[m], ptx_slices)
        return _optimizer_step(carry, batch, rows_Am, ptx_mb, models, settings, runtime, first, bases)

    carry, xs = (state.policy, state.value), (rows_SAm, jnp.arange(E * M) % M)
    if first is not None:
        carry, first_stats = step(carry, jax.tree.map(lambda x: x[0], xs), first)
        xs = jax.tree.map(lambda x: x[1:], xs)
    (policy, value), stats = jax.lax.scan(step, carry, xs)
    if first is not None:
        stats = jax.tree.map(lambda a, rest: jnp.concatenate([a[None], rest]), first_stats, stats)
    return state.replace(policy=policy, value=value), stats


def rollout_metrics(batch: Rollout, sampler_logprobs_BN, scores_B, kl_B, ended_B, settings: PPOSettings) -> dict:
    mask_BN = batch.mask_BN
    real = jnp.maximum(mask_BN.sum(), 1)
    # The sampler's own log-probs against the training forward's: float rounding only (large in bf16).
    mismatch = jnp.sum(jnp.where(mask_BN, jnp.abs(sampler_logprobs_BN - batch.old_logprobs_BN), 0.0)) / real
    stats = {"score_mean": scores_B.mean(), "score_std": scores_B.std(), "kl": kl_B.mean(),
             "logprob_mismatch": mismatch, "response_length": mask_BN.sum(1).mean(), "eos_rate": ended_B.mean(),
             "value_explained_var": L.explained_variance(batch.old_values_BN, batch.returns_BN, mask_BN)}
    if settings.samples:
        n = settings.samples
        stats["samples"] = {"prompt_ids": batch.prompt_ids_BP[:n], "prompt_mask": batch.prompt_mask_BP[:n],
                            "tokens": batch.tokens_BN[:n], "mask": mask_BN[:n], "score": scores_B[:n], "kl": kl_B[:n]}
    return stats


def update_metrics(steps: dict) -> dict:
    """Per-step stats to the iteration's: means over the optimizer steps, the ratio's extremes, and the first
    step's ratio (it sees the rollout's own policy: exactly 1)."""
    return {**{k: steps[k].mean() for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac",
                                            "value_clip_frac", "ptx_loss", "policy_grad_norm", "value_grad_norm")},
            "ratio_max": steps["ratio_max"].max(), "ratio_min": steps["ratio_min"].min(),
            "first_ratio_max": steps["ratio_max"][0], "first_ratio_min": steps["ratio_min"][0],
            "first_clip_frac": steps["clip_frac"][0]}


# --------------------------------------------------------------------------------------------- the math


def scores(models: PPOModels, settings: PPOSettings, params, prompt_ids_BP, prompt_mask_BP, tokens_BN,
           mask_BN) -> jax.Array:
    """Normalised reward-model scores at each sequence's last real token."""
    return reward_scores(models.reward, params, settings.reward_gain, settings.reward_bias, prompt_ids_BP,
                         prompt_mask_BP, tokens_BN, mask_BN)


def _old_logprobs_and_values(outputs, mb):
    stats, values_BN = outputs
    return stats.logprobs_BN, jnp.where(mb[3], values_BN, 0.0)


def ptx_target_tokens(ptx: dict) -> jax.Array:
    """The number of next-token targets of a pretraining (sft) batch: every real token after the first."""
    same_BT = ptx["segment_ids"][:, 1:] == ptx["segment_ids"][:, :-1]
    return jnp.sum(ptx["mask"][:, 1:] * same_BT, dtype=jnp.float32)


def ptx_loss(model: Transformer, params, ptx: dict, denominator=None) -> jax.Array:
    """PPO-ptx: the mean next-token NLL over every real token of a batch of the pretraining (sft) dataset
    (or its sum / denominator, to add up exactly over micro-batches)."""
    sums = sft_sums(model, params, ptx, ptx["mask"])
    return sums["nll_sum"] / (jnp.maximum(sums["target_tokens"], 1.0) if denominator is None else denominator)


def _forward(params, mb, models: PPOModels, settings: PPOSettings, bases: tuple = ({}, {})):
    """(TokenStats, values_BN): what the PPO objective reads of the policy and the value model on the rows
    `mb` = (prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN); `params`: what trains of both, joined with their
    frozen `bases`. With a coefficient of 0 the entropy is a metric: no backward through its softmax."""
    policy_params, value_params = (whole_params(p, base) for p, base in zip(params, bases))
    return (response_token_stats(models.policy, policy_params, *mb, models.sampling.temperature,
                                 entropy_grad=settings.entropy_coef != 0, vocab=models.sampling.vocab),
            response_values(models.value, value_params, *mb, settings.value_gain, settings.value_bias))


def _objective(outputs, mb: Rollout, settings: PPOSettings, tokens):
    """The clipped PPO objective of one micro-batch from its forward's `outputs`, means taken over the whole
    minibatch's `tokens`; returns (loss, stats)."""
    stats, values_BN = outputs
    s = settings
    pg_loss, pg_stats = L.policy_loss(stats.logprobs_BN, mb.old_logprobs_BN, mb.advantages_BN, mb.mask_BN,
                                      s.clip_ratio, tokens)
    entropy = L.masked_mean(stats.entropy_BN, mb.mask_BN, tokens)
    vf_loss, vf_stats = L.value_loss(values_BN, mb.old_values_BN, mb.returns_BN, mb.mask_BN, s.clip_value, tokens)
    loss = pg_loss - s.entropy_coef * entropy + s.vf_coef * vf_loss
    return loss, {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, **pg_stats, **vf_stats}


def _inputs(mb: Rollout):
    return mb.prompt_ids_BP, mb.prompt_mask_BP, mb.tokens_BN, mb.mask_BN


def _minibatch_loss(params, micro, models: PPOModels, settings: PPOSettings, tokens, ptx_tokens,
                    bases: tuple = ({}, {})):
    """The PPO objective of one micro-batch, its means taken over the whole minibatch's `tokens` (and
    `ptx_tokens`) so that micro-batch losses and gradients add up to the minibatch's exactly."""
    (policy_params, _), (mb, ptx) = params, micro
    loss, stats = _objective(_forward(params, _inputs(mb), models, settings, bases), mb, settings, tokens)
    lm_loss = jnp.zeros((), jnp.float32)
    if ptx is not None:  # InstructGPT's gamma x pretraining loss, in the same gradient as the PPO objective
        lm_loss = ptx_loss(models.policy, whole_params(policy_params, bases[0]), ptx, ptx_tokens)
        loss = loss + settings.ptx_coef * lm_loss
    return loss, {**stats, "ptx_loss": lm_loss}


def apply_gradients(train: TrainState, grads, optimizer) -> TrainState:
    """One optimizer step of `train` along `grads`."""
    updates, opt_state = optimizer.update(grads, train.opt_state, train.params)
    return TrainState(train.step + 1, optax.apply_updates(train.params, updates), opt_state)


def _optimizer_step(carry, batch: Rollout, rows_Am, ptx_mb, models: PPOModels, settings: PPOSettings,
                    runtime: Runtime, first: FirstForward | None, bases: tuple = ({}, {})):
    """One optimizer step of policy and value on the minibatch whose A micro-batches hold rows `rows_Am` (and
    the ptx slice `ptx_mb`, split alike), gradients summed micro-batch by micro-batch; with `first`, micro-batch
    0's forward is the rollout's. Returns ((policy, value), stats)."""
    policy, value = carry
    params = (policy.params, value.params)
    gather = lambda rows: runtime.on_batch_axes(jax.tree.map(lambda x: x[rows], batch))
    tokens = jnp.maximum(jnp.sum(batch.mask_BN[rows_Am.reshape(-1)], dtype=jnp.float32), 1.0)
    ptx_tokens, ptx_Am = None, None
    if ptx_mb is not None:
        ptx_mb = runtime.on_batch_axes(ptx_mb)
        ptx_tokens = jnp.maximum(ptx_target_tokens(ptx_mb), 1.0)
        ptx_Am = micro_batches(ptx_mb, rows_Am.shape[0])
    grad_fn = jax.value_and_grad(functools.partial(_minibatch_loss, models=models, settings=settings, tokens=tokens,
                                                   ptx_tokens=ptx_tokens, bases=bases), has_aux=True)

    def micro_batch(grads, xs):
        rows, ptx_micro = xs
        (_, stats), micro_grads = grad_fn(params, (gather(rows), runtime.on_batch_axes(ptx_micro)))
        return jax.tree.map(jnp.add, grads, micro_grads), stats

    xs = (rows_Am, ptx_Am)
    if first is None:
        grads, stats_A = jax.lax.scan(micro_batch, jax.tree.map(jnp.zeros_like, params), xs)
    else:
        head = jax.tree.map(lambda x: x[0], xs)
        grads, stats = _first_micro_batch_grads(first, params, (gather(head[0]), head[1]), models, settings, tokens,
                                                ptx_tokens, bases[0])
        grads, stats_rest = jax.lax.scan(micro_batch, grads, jax.tree.map(lambda x: x[1:], xs))
        stats_A = jax.tree.map(lambda a, rest: jnp.concatenate([a[None], rest]), stats, stats_rest)
    policy_grads, value_grads = grads
    # The norms read every gradient: the update's lap, taken on these stats, waits for the whole backward.
    stats = {**combine_micro_batches(stats_A), "policy_grad_norm": optax.tree.norm(policy_grads),
             "value_grad_norm": optax.tree.norm(value_grads)}
    return (apply_gradients(policy, policy_grads, models.policy_opt),
            apply_gradients(value, value_grads, models.value_opt)), stats


# --------------------------------------------------------------------------------------------- the speed-ups
# Micro-batching (gradient accumulation) and the first update step's forward shared with the rollout: the
# iteration computes the same numbers without them, only slower or in more memory.


def micro_batch_rows(order_MMb, accum: int) -> jax.Array:
    """rows_(M*A)m: the rows of every micro-batch, minibatch by minibatch, split as the update splits them."""
    return jax.vmap(lambda rows: micro_batches(rows, accum))(order_MMb).reshape(-1, order_MMb.shape[1] // accum)


class FirstForward(NamedTuple):
    """The first optimizer step's forward on its first micro-batch, run by the rollout (whose old log-probs and
    values it gives) and kept by `jax.vjp` for that step's backward: the rollout and the update share one pass."""

    outputs: tuple  # (TokenStats, values_BN), as `_forward` returns them
    pullback: Callable  # cotangents of `outputs` -> ((policy grads, value grads),)


def _first_micro_batch_grads(first: FirstForward, params, micro, models: PPOModels, settings: PPOSettings, tokens,
                             ptx_tokens, policy_base=None):
    """`_minibatch_loss`'s gradients on the micro-batch whose forward the rollout already ran: the objective's
    cotangents through `first.pullback`, plus the ptx term's own gradient."""
    mb, ptx = micro
    (_, stats), cotangents = jax.value_and_grad(_objective, has_aux=True)(first.outputs, mb, settings, tokens)
    policy_grads, value_grads = first.pullback(cotangents)[0]
    lm_loss = jnp.zeros((), jnp.float32)
    if ptx is not None:
        lm_loss, lm_grads = jax.value_and_grad(lambda p: ptx_loss(models.policy, whole_params(p, policy_base), ptx,
                                                                  ptx_tokens))(params[0])
        policy_grads = jax.tree.map(lambda g, lm: g + settings.ptx_coef * lm, policy_grads, lm_grads)
    return (policy_grads, value_grads), {**stats, "ptx_loss": lm_loss}


def combine_micro_batches(stats_A: dict) -> dict:
    """Per-micro-batch stats (leading axis) to the minibatch's: means were taken over the whole minibatch, so
    they add; the ratio extremes combine by max / min."""
    pick = {"ratio_max": jnp.max, "ratio_min": jnp.min}
    return {k: pick.get(k, jnp.sum)(v, axis=0) for k, v in stats_A.items()}
