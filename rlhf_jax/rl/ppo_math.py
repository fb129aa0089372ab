"""The PPO math of stage 3 as pure array functions; each is tested against a naive loop.

Response tensors are (B, N), N = new tokens. mask_BN is True for the real response tokens, up to and including
the first EOS, then False: rows are right-padded, so every row's mask is a prefix (possibly all True when the
response never ended). Values at masked positions may be anything (even inf/nan): every function selects with
jnp.where before doing arithmetic, so padding can neither leak into real positions nor poison a sum.

Means over tokens take an optional `denominator`. None: the mean over this call's real tokens. A number: the
sums are divided by it instead, so that with denominator = the real-token count of the whole minibatch, the
losses and gradients of its micro-batches add up exactly to those of the minibatch (mean-type stats add up
too; ratio_max/ratio_min combine with max/min).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x at real positions, 0 elsewhere (where, not multiply: 0 * inf is nan)."""
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def _denom(mask: jax.Array, denominator) -> jax.Array:
    if denominator is None:
        return jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)  # no real token: sums are 0, mean 0
    return _f32(denominator)


def masked_mean(x: jax.Array, mask: jax.Array, denominator=None) -> jax.Array:
    """Mean of x over the real positions (0 when there are none), or their sum / denominator."""
    return jnp.sum(_masked(_f32(x), mask)) / _denom(mask, denominator)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = False) -> jax.Array:
    """Variance of x over the real positions. Biased (divide by n) by default, as lm-human-preferences'
    tf.nn.moments; unbiased=True divides by n - 1 (TRL), which needs at least 2 real positions."""
    mean = masked_mean(x, mask)
    sq = jnp.sum(_masked(jnp.square(_f32(x) - mean), mask))
    n = jnp.sum(mask, dtype=jnp.float32)
    return sq / jnp.maximum(n - 1.0 if unbiased else n, 1.0)


def whiten(x_BN: jax.Array, mask_BN: jax.Array, shift_mean: bool = True, unbiased: bool = False,
           eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) with mean and var over the real tokens only; 0 at padding.
    shift_mean=False adds the mean back (lm-human-preferences' reward scaling): unit variance, mean kept."""
    x_BN = _f32(x_BN)
    mean = masked_mean(x_BN, mask_BN)
    out_BN = (x_BN - mean) * jax.lax.rsqrt(masked_var(x_BN, mask_BN, unbiased) + eps)
    if not shift_mean:
        out_BN = out_BN + mean
    return _masked(out_BN, mask_BN)


def kl_per_token(logprobs_BN: jax.Array, ref_logprobs_BN: jax.Array, mask_BN: jax.Array,
                 estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) on the sampled tokens, 0 at padding.
    k1 = logp - logp_ref (InstructGPT; unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = p_ref / p (unbiased, always >= 0)."""
    d_BN = _masked(_f32(ref_logprobs_BN) - _f32(logprobs_BN), mask_BN)  # 0 at padding, so both give 0 there
    if estimator == "k1":
        kl_BN = -d_BN
    elif estimator == "k3":
        kl_BN = jnp.expm1(d_BN) - d_BN  # expm1: exact near d = 0, where k3 ~ d^2 / 2
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1' or 'k3'")
    return kl_BN


def last_token_index(mask_BN: jax.Array) -> jax.Array:
    """Index of each row's last real token (the first EOS, or N - 1 when the response never ended);
    -1 for a row with no real token (a padding row of the batch)."""
    N = mask_BN.shape[1]
    last_B = N - 1 - jnp.argmax(mask_BN[:, ::-1], axis=1)
    return jnp.where(jnp.any(mask_BN, axis=1), last_B, -1).astype(jnp.int32)


def score_with_eos_penalty(scores_B: jax.Array, ended_B: jax.Array, penalty: float | None) -> jax.Array:
    """The reward model score, replaced by `penalty` for responses that never produced an EOS (the TL;DR
    reproduction uses -1); unchanged when penalty is None."""
    scores_B = _f32(scores_B)
    if penalty is None:
        return scores_B
    return jnp.where(ended_B, scores_B, jnp.float32(penalty))


def token_rewards(scores_B: jax.Array, kl_BN: jax.Array, mask_BN: jax.Array, beta) -> jax.Array:
    """Per-token reward: -beta * kl on every real token, plus the score at exactly the last real token
    (the first EOS, else the last position). 0 at padding; a row with no real token gets nothing."""
    N = mask_BN.shape[1]
    at_last_BN = jax.nn.one_hot(last_token_index(mask_BN), N, dtype=jnp.float32)  # index -1: all zeros
    return -_f32(beta) * _masked(_f32(kl_BN), mask_BN) + at_last_BN * _f32(scores_B)[:, None]


def gae(rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation as a reverse scan over the response. The value after the last real
    token is 0 (the episode ends there) and padding contributes nothing: rewards and values are read only at
    real tokens, and advantages and returns are 0 at padding (mask them out of any mean).
    returns = advantages + values, so compute them BEFORE whitening the advantages.
    mask_BN must be a prefix per row (right-padded responses): a hole would cut the recursion there."""
    mask_NB = mask_BN.T
    rewards_NB = _masked(_f32(rewards_BN), mask_BN).T
    values_NB = _masked(_f32(values_BN), mask_BN).T

    def step(carry, xs):
        next_value_B, next_adv_B = carry  # both 0 after the last real token
        reward_B, value_B, real_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = jnp.where(real_B, delta_B + gamma * lam * next_adv_B, 0.0)
        return (value_B, adv_B), adv_B

    zeros_B = jnp.zeros(mask_BN.shape[:1], jnp.float32)
    _, adv_NB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_NB, values_NB, mask_NB), reverse=True)
    advantages_BN = adv_NB.T
    returns_BN = _masked(advantages_BN + values_NB.T, mask_BN)
    return advantages_BN, returns_BN


def policy_loss(logprobs_BN: jax.Array, old_logprobs_BN: jax.Array, advantages_BN: jax.Array,
                mask_BN: jax.Array, clip_ratio: float = 0.2, denominator=None) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = exp(logp - logp_old). Stats: approx_kl = 0.5 mean (logp - logp_old)^2; clip_frac = fraction of real
    tokens where the clipped term is strictly larger (its gradient is 0 there); ratio_max, ratio_min over real
    tokens (-inf / +inf when there are none). See the module docstring for `denominator`."""
    dlogp_BN = _masked(_f32(logprobs_BN) - _f32(old_logprobs_BN), mask_BN)  # 0 at padding: ratio 1, no overflow
    ratio_BN = jnp.exp(dlogp_BN)
    adv_BN = _masked(_f32(advantages_BN), mask_BN)
    unclipped_BN = -adv_BN * ratio_BN
    clipped_BN = -adv_BN * jnp.clip(ratio_BN, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_mean(jnp.maximum(unclipped_BN, clipped_BN), mask_BN, denominator)
    stats = {
        "approx_kl": 0.5 * masked_mean(jnp.square(dlogp_BN), mask_BN, denominator),
        "clip_frac": masked_mean((clipped_BN > unclipped_BN).astype(jnp.float32), mask_BN, denominator),
        "ratio_max": jnp.max(jnp.where(mask_BN, ratio_BN, -jnp.inf)),
        "ratio_min": jnp.min(jnp.where(mask_BN, ratio_BN, jnp.inf)),
    }
    return loss, jax.lax.stop_gradient(stats)


def value_loss(values_BN: jax.Array, old_values_BN: jax.Array, returns_BN: jax.Array, mask_BN: jax.Array,
               clip_value: float = 0.2, denominator=None) -> tuple[jax.Array, dict]:
    """Clipped value loss: 0.5 mean over real tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).
    Stats: value_clip_frac = fraction of real tokens where the clipped term is strictly larger.
    See the module docstring for `denominator`."""
    v_BN = _masked(_f32(values_BN), mask_BN)
    old_BN = _masked(_f32(old_values_BN), mask_BN)
    ret_BN = _masked(_f32(returns_BN), mask_BN)
    unclipped_BN = jnp.square(v_BN - ret_BN)
    clipped_BN = jnp.square(jnp.clip(v_BN, old_BN - clip_value, old_BN + clip_value) - ret_BN)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_BN, clipped_BN), mask_BN, denominator)
    stats = {"value_clip_frac": masked_mean((clipped_BN > unclipped_BN).astype(jnp.float32), mask_BN,
                                            denominator)}
    return loss, jax.lax.stop_gradient(stats)


def explained_variance(values_BN: jax.Array, returns_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
    """1 - var(R - V) / var(R) over real tokens (biased variances): 1 for perfect values, 0 for a constant
    guess of the mean, negative when worse. 0 when the returns have no variance (undefined, but no nan)."""
    var_ret = masked_var(returns_BN, mask_BN)
    var_err = masked_var(_f32(returns_BN) - _f32(values_BN), mask_BN)
    return jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)


def token_entropy(logits_BNV: jax.Array) -> jax.Array:
    """entropy_BN of softmax(logits) at each position, in float32. Pass logits already divided by the sampling
    temperature. Logits of -inf (masked vocabulary) are fine: they contribute 0, not nan."""
    logp_BNV = jax.nn.log_softmax(_f32(logits_BNV), axis=-1)
    p_BNV = jnp.exp(logp_BNV)
    # p log p -> 0 as p -> 0; the inner where keeps -inf out of the product and of its gradient
    return -jnp.sum(p_BNV * jnp.where(p_BNV > 0, logp_BNV, 0.0), axis=-1)


def entropy_from_logits(logits_BNV: jax.Array, mask_BN: jax.Array, denominator=None) -> jax.Array:
    """Mean over real tokens of `token_entropy`."""
    return masked_mean(token_entropy(logits_BNV), mask_BN, denominator)


class KLController(NamedTuple):
    """State of the KL penalty coefficient (a pytree: it goes through jit and into checkpoints)."""
    beta: jax.Array  # float32 scalar

    @classmethod
    def create(cls, beta: float) -> "KLController":
        return cls(beta=jnp.asarray(beta, jnp.float32))

    def update(self, kl, target: float | None, horizon: float, n_steps) -> "KLController":
        return KLController(beta=update_beta(self.beta, kl, target, horizon, n_steps))


def update_beta(beta, kl, target: float | None, horizon: float, n_steps) -> jax.Array:
    """Adaptive KL (Ziegler et al. 2019): beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon),
    with kl the batch mean of the sequence-summed KL and n_steps the episodes since the last update
    (lm-human-preferences: the batch size). Fixed beta when target is None or 0."""
    beta = _f32(beta)
    if not target:
        return beta
    error = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * _f32(n_steps) / horizon)
