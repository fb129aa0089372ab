"""The math of GRPO and RLOO as pure array functions over groups of responses; each is tested against a loop.

The G responses to one prompt are consecutive rows (row b * G + g), so (R,) -> (B, G) is a reshape. Response
tensors are (R, N) with mask_RN a prefix per row, as in `ppo_math`, whose conventions hold here too: padding is
selected away with jnp.where before any arithmetic, and a reduction's `rows` / `tokens` denominators, when given,
are those of the whole minibatch, so that the losses of its micro-batches add up to the minibatch's exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.rl.ppo_math import _f32, _masked, masked_mean

STD_EPS = 1e-4  # GRPO's guard against a group whose rewards are all equal (std 0)


def grouped(x_R: jax.Array, group_size: int) -> jax.Array:
    """x_BG: the rows of each prompt's group side by side."""
    return _f32(x_R).reshape(-1, group_size)


def relative_to_first(rewards_BG: jax.Array) -> jax.Array:
    """Each group's rewards minus its first: the same differences, exactly 0 for a group whose rewards are all
    equal. Means and sums of equal float32 rewards round (0.7 x 8 / 8 is not 0.7), and divided by a rounded std
    + 1e-4 a difference of 1e-7 became an advantage of 6e-4 of one sign for the whole group, which Adam turns into a
    full step; advantages depend only on differences, so they are taken from these."""
    return rewards_BG - rewards_BG[:, :1]


def group_std(rewards_BG: jax.Array) -> jax.Array:
    """std_B: each group's sample standard deviation (dividing by G - 1)."""
    return jnp.std(_f32(rewards_BG), axis=1, ddof=1)


def grpo_advantages(rewards_R: jax.Array, group_size: int, scale_by_std: bool = True) -> jax.Array:
    """GRPO (Shao et al. 2024), one advantage per response: (r_i - mean of its group) / (std of its group + 1e-4);
    without `scale_by_std` only the mean is taken away (Dr. GRPO, Liu et al. 2025: no bias towards groups whose
    rewards hardly differ). A group whose rewards are all equal gets 0 either way."""
    rewards_BG = relative_to_first(grouped(rewards_R, group_size))
    centred_BG = rewards_BG - rewards_BG.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred_BG = centred_BG / (group_std(rewards_BG)[:, None] + STD_EPS)
    return centred_BG.reshape(-1)


def rloo_rewards(scores_R: jax.Array, kl_R: jax.Array | None, kl_coef: float) -> jax.Array:
    """RLOO's reward of a whole response: its score minus kl_coef x its KL to the reference (summed over its
    tokens); the score alone without a reference."""
    if kl_R is None:
        return _f32(scores_R)
    return _f32(scores_R) - jnp.float32(kl_coef) * _f32(kl_R)


def rloo_advantages(rewards_R: jax.Array, group_size: int) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean reward of the OTHER G - 1 responses to the same prompt,
    an unbiased baseline since it does not depend on response i."""
    rewards_BG = relative_to_first(grouped(rewards_R, group_size))
    others_BG = (rewards_BG.sum(axis=1, keepdims=True) - rewards_BG) / (group_size - 1)
    return (rewards_BG - others_BG).reshape(-1)


def surrogate_losses(logprobs_RN: jax.Array, old_logprobs_RN: jax.Array, advantages_R: jax.Array,
                     mask_RN: jax.Array, clip_low: float | None, clip_high: float | None = None,
                     tokens=None) -> tuple[jax.Array, dict]:
    """Per-token policy losses, 0 at padding, with r = exp(logp - logp_old) and A the response's advantage:
    -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) (clip_high None: clip_low; DAPO's clip-higher when
    larger), or REINFORCE's -r A (gradient -A grad log pi at r = 1) when clip_low is None. Stats over the real
    tokens (means over `tokens` when given): approx_kl = 0.5 mean (logp - logp_old)^2, clip_frac (the clipped
    term strictly larger: no gradient there), ratio_max, ratio_min."""
    dlogp_RN = _masked(_f32(logprobs_RN) - _f32(old_logprobs_RN), mask_RN)  # 0 at padding: ratio 1
    ratio_RN = jnp.exp(dlogp_RN)
    adv_RN = jnp.broadcast_to(_f32(advantages_R)[:, None], ratio_RN.shape)
    unclipped_RN = -adv_RN * ratio_RN
    if clip_low is None:
        losses_RN, clipped_RN = unclipped_RN, jnp.zeros(ratio_RN.shape, bool)
    else:
        high = clip_low if clip_high is None else clip_high
        bounded_RN = -adv_RN * jnp.clip(ratio_RN, 1.0 - clip_low, 1.0 + high)
        losses_RN, clipped_RN = jnp.maximum(unclipped_RN, bounded_RN), bounded_RN > unclipped_RN
    stats = {"approx_kl": 0.5 * masked_mean(jnp.square(dlogp_RN), mask_RN, tokens),
             "clip_frac": masked_mean(clipped_RN.astype(jnp.float32), mask_RN, tokens),
             "ratio_max": jnp.max(jnp.where(mask_RN, ratio_RN, -jnp.inf)),
             "ratio_min": jnp.min(jnp.where(mask_RN, ratio_RN, jnp.inf))}
    return _masked(losses_RN, mask_RN), jax.lax.stop_gradient(stats)


AVERAGES = ("sequence", "token", "sum")


def average_losses(losses_RN: jax.Array, mask_RN: jax.Array, mode: str, rows=None, tokens=None) -> jax.Array:
    """The loss of a batch of responses from per-token losses:
    sequence: the mean over each response's tokens, then the mean over responses (GRPO);
    token: the mean over every token of the batch (DAPO; long responses weigh more);
    sum: the sum over each response's tokens, then the mean over responses (REINFORCE on whole responses).
    `rows` / `tokens`: the whole minibatch's response and token counts (default: this batch's)."""
    losses_RN = _masked(_f32(losses_RN), mask_RN)
    rows = jnp.float32(mask_RN.shape[0]) if rows is None else _f32(rows)
    if mode == "token":
        return masked_mean(losses_RN, mask_RN, tokens)
    per_response_R = losses_RN.sum(axis=1)
    if mode == "sequence":
        per_response_R = per_response_R / jnp.maximum(jnp.sum(mask_RN, axis=1, dtype=jnp.float32), 1.0)
    elif mode != "sum":
        raise ValueError(f"unknown loss average {mode!r}: expected one of {AVERAGES}")
    return per_response_R.sum() / rows
