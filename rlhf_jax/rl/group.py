"""One GRPO or RLOO iteration as one pure function, jitted over the mesh with the state donated.

`iteration` reads as the algorithm: each prompt repeated G times; sample; rewards (the reward model, or the
user's reward function on the host through a callback inside the same program); old and reference log-probs;
advantages within each prompt's group; `epochs` x `minibatches` policy updates. There is no value model: the
other responses to the same prompt are the baseline. The math is in `group_math`; sampling, micro-batching, the
phase clock and the first update step's forward shared with the rollout (whose ratio is therefore exactly 1)
come from `ppo`.

Shapes: B prompts of P left-padded tokens, G responses per prompt, R = B * G rows with a group's rows consecutive
(row b * G + g), N new tokens, V vocabulary; E epochs, M minibatches of Mb rows, A micro-batches of m rows.
Every response tensor is (R, N) with mask_RN True up to and including the first EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.models.sampling import SamplingParams, is_eos
from rlhf_jax.models.transformer import Transformer, without_adapters
from rlhf_jax.rl import group_math as G, ppo, ppo_math as L
from rlhf_jax.rl.ppo import FirstForward, Runtime
from rlhf_jax.rl.scoring import TokenStats, response_token_stats, reward_scores
from rlhf_jax.training.steps import TrainState, micro_batches, whole_params

ALGORITHMS = ("grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """The numbers of an iteration (the grpo and rloo stages fill them from their config section)."""

    algorithm: str = "grpo"  # "grpo" | "rloo"
    group_size: int = 8
    epochs: int = 1
    minibatches: int = 1
    clip_ratio: float = 0.2  # rloo: 0 = plain REINFORCE, no clipping
    clip_ratio_high: float = 0.0  # grpo: the upper clip epsilon; 0 = clip_ratio
    kl_coef: float = 0.04  # grpo: weight of the k3 loss term; rloo: of the KL subtracted from each reward
    scale_by_std: bool = True  # grpo: divide by the group's reward std (false: Dr. GRPO's advantage)
    loss_average: str = "sequence"  # grpo: "sequence" | "token"; rloo always sums over each response's tokens
    reward_gain: float = 1.0  # the reward model's normalisation: reward = gain * head + bias
    reward_bias: float = 0.0
    accum: int = 1  # micro-batches per minibatch (gradient accumulation)
    share_prompts: bool = True  # each prompt's prefill and passes run once per group; minibatches hold whole groups
    no_eos_penalty: float | None = None  # the reward of a response that never ended
    samples: int = 0  # rollout rows returned under metrics["samples"] (for samples.jsonl)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}: expected one of {ALGORITHMS}")
        if self.loss_average not in ("sequence", "token"):
            raise ValueError(f"unknown loss_average {self.loss_average!r}: expected 'sequence' or 'token'")

    @property
    def uses_reference(self) -> bool:
        """Whether the iteration reads the reference policy (no reference forward at all when kl_coef is 0)."""
        return self.kl_coef > 0

    def clip_range(self) -> tuple[float | None, float | None]:
        """(clip_low, clip_high) of `group_math.surrogate_losses`; (None, None): REINFORCE, unclipped."""
        if self.algorithm == "rloo":
            return (self.clip_ratio, self.clip_ratio) if self.clip_ratio else (None, None)
        return self.clip_ratio, (self.clip_ratio_high or self.clip_ratio)

    @property
    def average(self) -> str:
        return self.loss_average if self.algorithm == "grpo" else "sum"

    @property
    def prompt_rows(self) -> int:
        """Rows per prompt pass: `group_size` when a group's rows share one (`share_prompts`), else 1."""
        return self.group_size if self.share_prompts else 1


@dataclasses.dataclass(frozen=True)
class GroupModels:
    """The policy (the reference shares its architecture), its optimizer, the sampler's settings, and the reward
    model (None when a reward function scores the responses)."""

    policy: Transformer
    policy_opt: optax.GradientTransformation
    sampling: SamplingParams
    reward: Transformer | None = None


@flax.struct.dataclass
class GroupState:
    """Everything an iteration changes, checkpointed together: the policy with its optimizer state (at
    ("policy", "params"), as in a ppo run) and the PRNG key of the next iteration."""

    policy: TrainState
    rng: jax.Array


class Frozen(NamedTuple):
    """Parameters an iteration reads and never changes: the reference policy (None when kl_coef is 0; for a LoRA
    policy, what it holds beyond the policy's base, as in `ppo.Frozen`), the reward model (None with a reward
    function) and a LoRA policy's frozen base ({} in full fine-tuning)."""

    ref_params: Any = None
    reward_params: Any = None
    policy_base: Any = {}

    def reference(self):
        return whole_params(self.ref_params, self.policy_base)


class GroupBatch(NamedTuple):
    """What the update trains on, row by row."""

    prompt_ids_RP: jax.Array
    prompt_mask_RP: jax.Array
    tokens_RN: jax.Array
    mask_RN: jax.Array
    old_logprobs_RN: jax.Array
    ref_logprobs_RN: jax.Array | None  # None without a reference
    advantages_R: jax.Array


# (prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN) as numpy -> one float per row, run on the host.
RewardsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def init_state(policy_params, models: GroupModels, rng: jax.Array) -> GroupState:
    """The first state. The iteration donates it, so `Frozen` must hold copies, not these same arrays."""
    return GroupState(policy=TrainState(jnp.zeros((), jnp.int32), policy_params, models.policy_opt.init(policy_params)),
                      rng=rng)


# --------------------------------------------------------------------------------------------- the iteration


def iteration(state: GroupState, frozen: Frozen, prompt_ids_BP, prompt_mask_BP, *, models: GroupModels,
              settings: GroupSettings, rewards_fn: RewardsFn | None = None, runtime: Runtime = Runtime()):
    """One whole GRPO / RLOO iteration, pure (but for the runtime's lap clock and the reward function's host
    callback), for one jit over the mesh with `state` donated. `rewards_fn` scores the sampled rows on the host
    (None: the reward model does). Returns (state, metrics)."""
    host_wait_s, (prompt_ids_BP, prompt_mask_BP) = runtime.lap((prompt_ids_BP, prompt_mask_BP))
    rng, sample_rng, order_rng = jax.random.split(state.rng, 3)
    # 1: every prompt G times; the rows (not the few prompts) split over the data-parallel devices
    prompt_ids_RP, prompt_mask_RP = runtime.on_batch_axes(repeat_prompts(prompt_ids_BP, prompt_mask_BP, settings))
    orders_EMMb = minibatch_orders(order_rng, prompt_ids_BP.shape[0], settings)
    # 2-5: sample; rewards; old and reference log-probs; advantages
    batch, stats, first = rollout(state, frozen, prompt_ids_RP, prompt_mask_RP, sample_rng, models, settings,
                                  rewards_fn, runtime, orders_EMMb[0])
    rollout_s, (batch, stats) = runtime.lap((batch, stats))
    # 6: epochs x minibatches of policy updates
    policy, steps = update(state.policy, batch, orders_EMMb, models, settings, runtime, first, frozen.policy_base)
    update_s, steps = runtime.lap(steps, gate=False)  # complete with the last step's gradient norm
    metrics = {**stats, **update_metrics(steps)}
    if runtime.clock is not None:  # host_wait_s: from the previous iteration's end (host loop work, compilation)
        metrics.update(rollout_s=rollout_s, update_s=update_s, host_wait_s=host_wait_s)
    return state.replace(policy=policy, rng=rng), metrics


def rollout(state: GroupState, frozen: Frozen, prompt_ids_RP, prompt_mask_RP, rng, models: GroupModels,
            settings: GroupSettings, rewards_fn: RewardsFn | None = None, runtime: Runtime = Runtime(),
            first_order_MMb=None):
    """Steps 2-5 on the repeated prompts: everything the update needs. Returns (batch, stats, FirstForward);
    `first_order_MMb` is the first epoch's minibatch rows (default: rows in order)."""
    sampled = ppo.sample_responses(whole_params(state.policy.params, frozen.policy_base), prompt_ids_RP,
                                   prompt_mask_RP, rng, models, settings.prompt_rows)
    responses = (prompt_ids_RP, prompt_mask_RP, sampled.tokens_BN, sampled.mask_BN)
    forced, first = teacher_force(state, frozen, responses, models, settings, runtime, first_order_MMb)
    rewards_R = forced.scores_R if rewards_fn is None else function_rewards(rewards_fn, runtime.everywhere(responses))
    ended_R = jnp.any(sampled.mask_BN & is_eos(sampled.tokens_BN, models.sampling.eos_ids), axis=1)
    rewards_R = L.score_with_eos_penalty(rewards_R, ended_R, settings.no_eos_penalty)
    kl_R = None
    if forced.ref_logprobs_RN is not None:  # k1 per sequence: the KL metric, and RLOO's penalty
        kl_R = L.kl_per_token(forced.old_logprobs_RN, forced.ref_logprobs_RN, sampled.mask_BN, "k1").sum(1)
    advantages_R = advantages(rewards_R, kl_R, settings)
    batch = GroupBatch(*responses, forced.old_logprobs_RN, forced.ref_logprobs_RN, advantages_R)
    stats = rollout_metrics(batch, sampled.logprobs_BN, rewards_R, kl_R, ended_R, settings)
    return batch, stats, first


# --------------------------------------------------------------------------------------------- the steps


def repeat_prompts(prompt_ids_BP, prompt_mask_BP, settings: GroupSettings):
    """1. (prompt_ids_RP, prompt_mask_RP): prompt b in rows b * G .. b * G + G - 1."""
    return (jnp.repeat(prompt_ids_BP, settings.group_size, axis=0),
            jnp.repeat(prompt_mask_BP, settings.group_size, axis=0))


def minibatch_orders(rng, prompts: int, settings: GroupSettings) -> jax.Array:
    """orders_EMMb: the rows of each of the M minibatches of each of the E epochs, a fresh permutation per epoch:
    of the rows, or with `share_prompts` of the prompts' groups, each group's rows kept together (`group_rows`)."""
    if not settings.share_prompts:
        return ppo.minibatch_orders(rng, prompts * settings.group_size, settings)
    keys = jax.random.split(rng, settings.epochs)
    return group_rows(jax.vmap(lambda key: jax.random.permutation(key, prompts))(keys), settings)


def group_rows(groups_EB, settings: GroupSettings) -> jax.Array:
    """orders_EMMb of the rows of the groups in each epoch's order `groups_EB`, placed so that every micro-batch
    (`micro_batches` takes every accum-th row of a minibatch) holds whole groups, each group's G rows
    consecutive: micro-batch a of a minibatch holds its groups a, a + accum, ..."""
    E, B = groups_EB.shape
    M, A, Gs = settings.minibatches, settings.accum, settings.group_size
    groups_EMAj = groups_EB.reshape(E, M, B // (M * A), A).swapaxes(-1, -2)
    rows_EMAm = (groups_EMAj[..., None] * Gs + jnp.arange(Gs)).reshape(E, M, A, -1)
    return rows_EMAm.swapaxes(-1, -2).reshape(E, M, -1)  # row a + accum * j of a minibatch: micro-batch a's j-th


def function_rewards(rewards_fn: RewardsFn, responses) -> jax.Array:
    """3. rewards_R from the user's reward function, called on the host with the whole batch (every row
    gathered) through a callback, so that the iteration stays one program. The function must not raise: it
    records its problem for the host loop to report and returns zeros (`stages.grpo.RewardFunction`)."""
    R = responses[2].shape[0]
    call = lambda *arrays: np.asarray(rewards_fn(*arrays), np.float32).reshape(R)
    return jax.pure_callback(call, jax.ShapeDtypeStruct((R,), jnp.float32), *responses)


class Forced(NamedTuple):
    """Step 4's outputs, row by row."""

    old_logprobs_RN: jax.Array
    ref_logprobs_RN: jax.Array | None  # None without a reference
    scores_R: jax.Array | None  # the reward model's normalised score; None without a reward model


def teacher_force(state: GroupState, frozen: Frozen, responses, models: GroupModels, settings: GroupSettings,
                  runtime: Runtime, first_order_MMb=None) -> tuple[Forced, FirstForward]:
    """4. The sampled tokens through the policy (old log-probs), the reference (reference log-probs, when
    kl_coef > 0) and the reward model (scores, when there is one), micro-batch by micro-batch as the first
    epoch's update splits them (it fits where the update fits). The old log-probs come from the training forward
    itself, so the first minibatch's ratio is exactly 1; its first micro-batch's forward is the update's own
    (`FirstForward`, kept by `jax.vjp`), not run twice. As `ppo.teacher_force`, without a value model."""
    R = responses[0].shape[0]
    if first_order_MMb is None:  # in order
        first_order_MMb = (group_rows(jnp.arange(R // settings.group_size)[None], settings)[0] if settings.share_prompts
                           else jnp.arange(R).reshape(settings.minibatches, -1))
    rows_Km = ppo.micro_batch_rows(first_order_MMb, settings.accum)
    gather = lambda rows: runtime.on_batch_axes([x[rows] for x in responses])
    params = state.policy.params
    with_reference, with_reward_model = settings.uses_reference, models.reward is not None

    def frozen_passes(rows):
        mb = gather(rows)
        ref_logprobs = (_forward(frozen.reference(), mb, models, settings, reference=True).logprobs_BN
                        if with_reference else None)
        scores = (reward_scores(models.reward, frozen.reward_params, settings.reward_gain, settings.reward_bias,
                                *mb, group=settings.prompt_rows) if with_reward_model else None)
        return ref_logprobs, scores

    def trained_pass(rows):
        mb = gather(rows)
        return _forward(params, mb, models, settings, frozen.policy_base).logprobs_BN

    frozen_K = jax.lax.map(frozen_passes, rows_Km) if with_reference or with_reward_model else (None, None)
    trained_rest = jax.lax.map(trained_pass, rows_Km[1:]) if rows_Km.shape[0] > 1 else None
    # The first micro-batch's forward keeps its activations for the update's backward: it runs last, so that they
    # live beside no other pass's.
    first_mb, frozen_K, trained_rest = jax.lax.optimization_barrier((gather(rows_Km[0]), frozen_K, trained_rest))
    stats_m, pullback = jax.vjp(lambda p: _forward(p, first_mb, models, settings, frozen.policy_base), params)
    old_K = _stacked(stats_m.logprobs_BN, trained_rest)

    def in_rows(x_K):  # (K, m, ...) in micro-batch order -> (R, ...) in row order
        if x_K is None:
            return None
        x_R = x_K.reshape(R, *x_K.shape[2:])
        return runtime.on_batch_axes(jnp.zeros_like(x_R).at[rows_Km.reshape(-1)].set(x_R))

    return Forced(in_rows(old_K), *map(in_rows, frozen_K)), FirstForward(stats_m, pullback)


def advantages(rewards_R, kl_R, settings: GroupSettings) -> jax.Array:
    """5. advantages_R: GRPO's group-normalised rewards, or RLOO's leave-one-out baseline on the rewards less
    kl_coef x each response's KL (k1, summed over its tokens)."""
    if settings.algorithm == "grpo":
        return G.grpo_advantages(rewards_R, settings.group_size, settings.scale_by_std)
    return G.rloo_advantages(G.rloo_rewards(rewards_R, kl_R, settings.kl_coef), settings.group_size)


def update(policy: TrainState, batch: GroupBatch, orders_EMMb, models: GroupModels, settings: GroupSettings,
           runtime: Runtime = Runtime(), first: FirstForward | None = None, base=None):
    """6. `epochs` x `minibatches` optimizer steps over the given minibatch rows (one flat scan); `first` is the
    rollout's forward of the first step's first micro-batch; `base`: a LoRA policy's frozen base. Returns
    (policy, per-step stats)."""
    E, M, _ = orders_EMMb.shape
    rows_SAm = jax.vmap(lambda rows: micro_batches(rows, settings.accum))(orders_EMMb.reshape(E * M, -1))

    def step(policy, rows_Am, first=None):
        return _optimizer_step(policy, batch, rows_Am, models, settings, runtime, first, base)

    if first is None:
        return jax.lax.scan(step, policy, rows_SAm)
    policy, first_stats = step(policy, rows_SAm[0], first)
    policy, stats = _scan(step, policy, rows_SAm[1:])
    return policy, _stacked(first_stats, stats)


def rollout_metrics(batch: GroupBatch, sampler_logprobs_RN, rewards_R, kl_R, ended_R,
                    settings: GroupSettings) -> dict:
    mask_RN = batch.mask_RN
    rewards_BG = G.grouped(rewards_R, settings.group_size)
    real = jnp.maximum(mask_RN.sum(), 1)
    # The sampler's own log-probs against the training forward's: float rounding only (large in bf16).
    mismatch = jnp.sum(jnp.where(mask_RN, jnp.abs(sampler_logprobs_RN - batch.old_logprobs_RN), 0.0)) / real
    stats = {"reward_mean": rewards_R.mean(), "reward_std": rewards_R.std(),
             "group_reward_std": G.group_std(rewards_BG).mean(),
             "zero_std_groups": jnp.mean(rewards_BG.max(1) == rewards_BG.min(1)),
             "response_length": mask_RN.sum(1).mean(), "eos_rate": ended_R.mean(), "logprob_mismatch": mismatch}
    if kl_R is not None:  # no reference, no KL (kl_coef 0)
        stats["kl"] = kl_R.mean()
    if settings.samples:
        n = settings.samples
        stats["samples"] = {"prompt_ids": batch.prompt_ids_RP[:n], "prompt_mask": batch.prompt_mask_RP[:n],
                            "tokens": batch.tokens_RN[:n], "mask": mask_RN[:n], "reward": rewards_R[:n]}
        if kl_R is not None:
            stats["samples"]["kl"] = kl_R[:n]
    return stats


def update_metrics(steps: dict) -> dict:
    """Per-step stats to the iteration's: means over the optimizer steps, the ratio's extremes, and the first
    step's ratio (it sees the rollout's own policy: exactly 1)."""
    return {**{k: steps[k].mean() for k in ("policy_loss", "entropy", "approx_kl", "clip_frac", "grad_norm")},
            "ratio_max": steps["ratio_max"].max(), "ratio_min": steps["ratio_min"].min(),
            "first_ratio_max": steps["ratio_max"][0], "first_ratio_min": steps["ratio_min"][0],
            "first_clip_frac": steps["clip_frac"][0]}


# --------------------------------------------------------------------------------------------- the objective


def _forward(params, mb, models: GroupModels, settings: GroupSettings, base=None,
             reference: bool = False) -> TokenStats:
    """Response-token log-probs and entropies under logits / temperature of the policy with `params` (joined with
    a LoRA policy's `base`) on the rows mb = (prompt ids, prompt mask, tokens, mask): what the sampler drew from;
    `reference`: of the policy without adapters, on the reference's params. With `share_prompts` the rows are
    whole groups (`group_rows`), and each group's prompt pass runs once."""
    model = without_adapters(models.policy) if reference else models.policy
    return response_token_stats(model, whole_params(params, base), *mb, models.sampling.temperature,
                                group=settings.prompt_rows, vocab=models.sampling.vocab)


class Sizes(NamedTuple):
    """A minibatch's response and real-token counts: the denominators of its means, so that the losses of its
    micro-batches add up to the minibatch's."""

    rows: jax.Array
    tokens: jax.Array


def objective(token_stats: TokenStats, mb: GroupBatch, settings: GroupSettings, sizes: Sizes | None = None):
    """The policy loss of (micro-)batch `mb` from its forward's `TokenStats`; returns (loss, stats). GRPO: the clipped
    surrogate plus kl_coef x k3 per token, averaged per settings.loss_average; RLOO: REINFORCE (or the clipped
    surrogate) summed over each response's tokens, averaged over responses."""
    mask_RN = mb.mask_RN
    if sizes is None:
        sizes = Sizes(jnp.float32(mask_RN.shape[0]), jnp.maximum(jnp.sum(mask_RN, dtype=jnp.float32), 1.0))
    logprobs_RN = token_stats.logprobs_BN
    losses_RN, stats = G.surrogate_losses(logprobs_RN, mb.old_logprobs_RN, mb.advantages_R, mask_RN,
                                          *settings.clip_range(), tokens=sizes.tokens)
    if settings.algorithm == "grpo" and settings.uses_reference:  # k3 >= 0, unbiased; its gradient pulls to ref
        losses_RN = losses_RN + settings.kl_coef * L.kl_per_token(logprobs_RN, mb.ref_logprobs_RN, mask_RN, "k3")
    loss = G.average_losses(losses_RN, mask_RN, settings.average, sizes.rows, sizes.tokens)
    entropy = L.masked_mean(token_stats.entropy_BN, mask_RN, sizes.tokens)  # a metric: no gradient flows
    return loss, {"policy_loss": loss, "entropy": entropy, **stats}


def _micro_batch_loss(params, mb: GroupBatch, models: GroupModels, settings: GroupSettings, sizes: Sizes, base=None):
    return objective(_forward(params, _inputs(mb), models, settings, base), mb, settings, sizes)


def _inputs(mb: GroupBatch):
    return mb.prompt_ids_RP, mb.prompt_mask_RP, mb.tokens_RN, mb.mask_RN


def _optimizer_step(policy: TrainState, batch: GroupBatch, rows_Am, models: GroupModels, settings: GroupSettings,
                    runtime: Runtime, first: FirstForward | None, base=None):
    """One optimizer step on the minibatch whose A micro-batches hold rows `rows_Am`, gradients summed
    micro-batch by micro-batch; with `first`, micro-batch 0's forward is the rollout's. Returns (policy, stats)."""
    params = policy.params
    gather = lambda rows: runtime.on_batch_axes(jax.tree.map(lambda x: x[rows], batch))
    all_rows = rows_Am.reshape(-1)
    sizes = Sizes(jnp.float32(all_rows.shape[0]),
                  jnp.maximum(jnp.sum(batch.mask_RN[all_rows], dtype=jnp.float32), 1.0))
    grad_fn = jax.value_and_grad(functools.partial(_micro_batch_loss, models=models, settings=settings, sizes=sizes,
                                                   base=base), has_aux=True)

    def micro_batch(grads, rows):
        (_, stats), micro_grads = grad_fn(params, gather(rows))
        return jax.tree.map(jnp.add, grads, micro_grads), stats

    if first is None:
        grads, stats_A = jax.lax.scan(micro_batch, jax.tree.map(jnp.zeros_like, params), rows_Am)
    else:  # micro-batch 0: the objective's cotangents through the rollout's own forward
        (_, stats), cotangents = jax.value_and_grad(objective, has_aux=True)(first.outputs, gather(rows_Am[0]),
                                                                             settings, sizes)
        grads, stats_rest = _scan(micro_batch, first.pullback(cotangents)[0], rows_Am[1:])
        stats_A = _stacked(stats, stats_rest)
    # The norm reads every gradient: the update's lap, taken on these stats, waits for the whole backward.
    stats = {**ppo.combine_micro_batches(stats_A), "grad_norm": optax.tree.norm(grads)}
    return ppo.apply_gradients(policy, grads, models.policy_opt), stats


def _scan(f, carry, xs):
    """jax.lax.scan, or (carry, None) with nothing to run, nor to compile, when xs is empty."""
    if xs.shape[0] == 0:
        return carry, None
    return jax.lax.scan(f, carry, xs)


def _stacked(head, rest):
    """Stacked per-step (or per-micro-batch) values: `head`, taken outside the loop, before the loop's `rest`."""
    if rest is None:
        return jax.tree.map(lambda a: a[None], head)
    return jax.tree.map(lambda a, r: jnp.concatenate([a[None], r]), head, rest)
