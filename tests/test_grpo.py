"""GRPO and RLOO: the group math against plain loops; one iteration as one compiled program on a tiny random model
(the first minibatch's ratio exactly 1, the reward function sees exactly the decoded responses cut at EOS, the
reward rises); the stages end to end (metrics, samples, export, resume) and the reward function's mistakes as one
line."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.errors import UserError
from rlhf_jax.config import OptimSection
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.transformer import PAD_ID, ModelConfig, init_params, make_model
from rlhf_jax.rl import group, group_math as GM
from rlhf_jax.rl.ppo_math import token_entropy
from rlhf_jax.rl.scoring import TokenStats
from rlhf_jax.stages.grpo import RewardFunction
from rlhf_jax.stages.policy_common import rollout_sampling
from rlhf_jax.training import state as training_state, steps
from rlhf_jax.training.losses import token_logprobs

import grpo_fixtures
from cli_helpers import run_quietly

CFG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_position_embeddings=64, eos_token_ids=(1,))
B, G, P, N = 4, 4, 6, 8
R = B * G
EOS_IDS = (1, 2, 3)  # three EOS ids: about a third of the responses end within N tokens


def _prefix_mask(rng, rows: int, n: int) -> np.ndarray:
    """Right-padded response masks of random lengths 1..n (one of exactly 1 token, one full)."""
    lengths = rng.integers(1, n + 1, rows)
    lengths[0], lengths[-1] = 1, n
    return np.arange(n)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------------------------ the math


def _rewards_with_a_flat_group(seed: int = 0) -> np.ndarray:
    rewards = np.random.default_rng(seed).normal(size=R).astype(np.float32)
    rewards[G:2 * G] = 0.5  # group 1: every reward equal
    return rewards


def test_grpo_advantages_equal_a_loop_over_groups():
    rewards = _rewards_with_a_flat_group()
    for scale_by_std in (True, False):
        got = np.asarray(GM.grpo_advantages(jnp.asarray(rewards), G, scale_by_std))
        expected = []
        for b in range(B):
            rows = [float(r) for r in rewards[b * G:(b + 1) * G]]
            mean, std = sum(rows) / G, statistics.stdev(rows)
            expected += [(r - mean) / (std + 1e-4) if scale_by_std else r - mean for r in rows]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert np.all(got[G:2 * G] == 0.0)  # a flat group teaches nothing
    np.testing.assert_allclose(np.asarray(GM.group_std(GM.grouped(jnp.asarray(rewards), G))),
                               [statistics.stdev(map(float, rewards[b * G:(b + 1) * G])) for b in range(B)], rtol=1e-5)


def test_rloo_advantages_equal_a_loop_over_groups():
    scores = _rewards_with_a_flat_group(1)
    kl = np.random.default_rng(2).uniform(0, 3, R).astype(np.float32)
    got = np.asarray(GM.rloo_advantages(GM.rloo_rewards(jnp.asarray(scores), jnp.asarray(kl), 0.1), G))
    rewards = [float(s) - 0.1 * float(k) for s, k in zip(scores, kl)]
    expected = []
    for i in range(R):
        others = [rewards[j] for j in range(i // G * G, i // G * G + G) if j != i]
        expected.append(rewards[i] - sum(others) / len(others))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    no_kl = np.asarray(GM.rloo_advantages(GM.rloo_rewards(jnp.asarray(scores), None, 0.1), G))
    assert np.all(no_kl[G:2 * G] == 0.0)


@pytest.mark.parametrize("group_size, value", [(8, 0.7), (8, 0.1), (7, 3.0), (4, 1.0), (5, -0.3)])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantages(group_size, value, compiled):
    """Equal rewards that float32 cannot hold exactly: their mean rounds, and under GRPO's std + 1e-4 a rounding
    difference became an advantage of one sign for the whole group (Adam's update is as large for it as for any)."""
    rewards = jnp.concatenate([jnp.arange(group_size, dtype=jnp.float32), jnp.full(2 * group_size, value,
                                                                                 jnp.float32)])
    fns = {"grpo": lambda r: GM.grpo_advantages(r, group_size), "dr_grpo": lambda r: GM.grpo_advantages(r, group_size,
           False), "rloo": lambda r: GM.rloo_advantages(r, group_size)}
    for name, fn in fns.items():
        got = np.asarray(jax.jit(fn)(rewards) if compiled else fn(rewards))
        assert np.all(got[group_size:] == 0.0), (name, got)  # equal groups after another
        assert np.all(np.diff(got[:group_size]) > 0), (name, got)  # the other group learns, in order


@pytest.mark.parametrize("prompts, minibatches, accum", [(4, 2, 2), (6, 3, 1), (8, 1, 4)])
def test_minibatch_orders_keep_each_group_whole_and_consecutive_in_one_micro_batch(prompts, minibatches, accum):
    """With share_prompts, every micro-batch the update takes (`micro_batches` of each minibatch) is whole groups,
    each group's G rows consecutive and in order; every epoch visits every row once, in a fresh order of groups;
    without it, rows are shuffled one by one."""
    settings = group.GroupSettings(group_size=G, epochs=3, minibatches=minibatches, accum=accum)
    orders = np.asarray(group.minibatch_orders(jax.random.key(0), prompts, settings))
    assert orders.shape == (3, minibatches, prompts * G // minibatches)
    group_orders = []
    for epoch in orders:
        assert sorted(epoch.reshape(-1).tolist()) == list(range(prompts * G))
        micro = np.asarray(jax.vmap(lambda rows: steps.micro_batches(rows, accum))(jnp.asarray(epoch)))
        runs = micro.reshape(-1, G)  # (micro-batches x groups each, G)
        np.testing.assert_array_equal(runs, runs[:, :1] + np.arange(G))
        assert np.all(runs[:, 0] % G == 0)
        group_orders.append(tuple(runs[:, 0] // G))
    assert len(set(group_orders)) == 3  # a fresh permutation per epoch
    rows = group.minibatch_orders(jax.random.key(0), prompts, dataclasses.replace(settings, share_prompts=False))
    assert any(np.any(np.diff(np.asarray(epoch).reshape(-1, G), axis=1) != 1) for epoch in rows)


def test_the_iterations_advantages_follow_the_algorithm():
    """GRPO's ignore the KL (it is a loss term there); RLOO's take kl_coef x KL off each reward first."""
    rewards, kl = _rewards_with_a_flat_group(2), np.linspace(0.0, 3.0, R).astype(np.float32)
    grpo = group.GroupSettings(algorithm="grpo", group_size=G, scale_by_std=False, kl_coef=0.5)
    np.testing.assert_allclose(np.asarray(group.advantages(jnp.asarray(rewards), jnp.asarray(kl), grpo)),
                               rewards - rewards.reshape(B, G).mean(1).repeat(G), rtol=1e-5, atol=1e-6)
    rloo = group.GroupSettings(algorithm="rloo", group_size=G, kl_coef=0.5)
    penalised = (rewards - 0.5 * kl).reshape(B, G)
    others = (penalised.sum(1, keepdims=True) - penalised) / (G - 1)
    np.testing.assert_allclose(np.asarray(group.advantages(jnp.asarray(rewards), jnp.asarray(kl), rloo)),
                               (penalised - others).reshape(-1), rtol=1e-5, atol=1e-5)


def _random_rows(seed: int = 0, V: int = 11):
    """Logits, old and reference log-probs, advantages and masks of R random responses."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(R, N, V)).astype(np.float32)
    tokens = rng.integers(0, V, (R, N)).astype(np.int32)
    mask = _prefix_mask(rng, R, N)
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), tokens[..., None], -1)[..., 0]
    old = np.where(mask, logp + rng.normal(scale=0.3, size=(R, N)), 0.0).astype(np.float32)
    ref = np.where(mask, logp + rng.normal(scale=0.5, size=(R, N)), 0.0).astype(np.float32)
    advantages = rng.normal(size=R).astype(np.float32)
    return logits, tokens, mask, np.where(mask, logp, 0.0), old, ref, advantages


def _loop_token_losses(logp, old, adv, mask, low, high):
    """Per-token losses in a loop: -min(r A, clip(r, 1 - low, 1 + high) A), or -r A without clipping."""
    out = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                ratio = float(np.exp(np.float64(logp[i, t]) - old[i, t]))
                if low is None:
                    out[i, t] = -ratio * adv[i]
                else:
                    out[i, t] = -min(ratio * adv[i], min(max(ratio, 1 - low), 1 + high) * adv[i])
    return out


def _loop_average(losses, mask, mode):
    rows = [[losses[i, t] for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]
    if mode == "token":
        return sum(map(sum, rows)) / sum(map(len, rows))
    per_row = [sum(row) / (len(row) if mode == "sequence" else 1) for row in rows]
    return sum(per_row) / len(per_row)


def test_surrogate_losses_and_their_stats_equal_a_loop():
    _, _, mask, logp, old, _, adv = _random_rows()
    for low, high in ((0.2, 0.28), (0.2, None), (None, None)):
        losses, stats = GM.surrogate_losses(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                            low, high)
        np.testing.assert_allclose(np.asarray(losses), _loop_token_losses(logp, old, adv, mask, low, high or low),
                                   rtol=1e-5, atol=1e-6)
        ratio = np.exp(logp - old)[mask]
        assert float(stats["ratio_max"]) == pytest.approx(ratio.max(), rel=1e-5)
        assert float(stats["ratio_min"]) == pytest.approx(ratio.min(), rel=1e-5)
        assert float(stats["approx_kl"]) == pytest.approx(0.5 * np.mean((logp - old)[mask] ** 2), rel=1e-5)
        a = np.broadcast_to(adv[:, None], mask.shape)[mask]
        clipped = (0.0 if low is None else
                   np.mean(-a * np.clip(ratio, 1 - low, 1 + (high or low)) > -a * ratio))
        assert float(stats["clip_frac"]) == pytest.approx(clipped, abs=1e-7)
        assert low is None or 0 < clipped < 1


def test_ratio_extremes_read_real_tokens_only_and_padding_never_reaches_the_losses():
    """Every real ratio above 1 (then every one below): ratio_min (ratio_max) is the real tokens' own, not the
    padding's 1; huge or NaN log-probs at padding change no loss, stat or gradient."""
    _, _, mask, logp, _, _, adv = _random_rows(4)
    rng = np.random.default_rng(4)
    for sign in (1.0, -1.0):
        old = np.where(mask, logp - sign * rng.uniform(0.01, 0.1, mask.shape), 0.0).astype(np.float32)
        ratio = np.exp(logp - old)[mask]
        clean = GM.surrogate_losses(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)
        assert float(clean[1]["ratio_min"]) == pytest.approx(ratio.min(), rel=1e-6)
        assert float(clean[1]["ratio_max"]) == pytest.approx(ratio.max(), rel=1e-6)
        assert (ratio > 1).all() if sign > 0 else (ratio < 1).all()
        for junk in (1e4, np.nan):
            logp_junk, old_junk = np.where(mask, logp, junk), np.where(mask, old, -junk)
            dirty = GM.surrogate_losses(jnp.asarray(logp_junk), jnp.asarray(old_junk), jnp.asarray(adv),
                                        jnp.asarray(mask), 0.2)
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), clean, dirty)
            grad = jax.grad(lambda lp: GM.surrogate_losses(lp, jnp.asarray(old_junk), jnp.asarray(adv),
                                                           jnp.asarray(mask), 0.2)[0].sum())(jnp.asarray(logp_junk))
            assert np.isfinite(np.asarray(grad)).all() and (np.asarray(grad)[~mask] == 0).all()


def test_rollout_metrics_equal_numpy():
    """The rollout's metrics from their definitions: a flat group counts in zero_std_groups, and the sampler's
    log-prob mismatch is a mean absolute difference over real tokens (errors of both signs do not cancel)."""
    _, tokens, mask, logp, old, ref, adv = _random_rows(5)
    rewards, kl, ended = _rewards_with_a_flat_group(5), np.linspace(0.0, 1.0, R), np.arange(R) % 3 == 0
    sampler = np.where(mask, old + np.where(np.arange(N) % 2, 1e-3, -1e-3), 7.0).astype(np.float32)
    settings = group.GroupSettings(group_size=G)
    stats = group.rollout_metrics(_batch(tokens, mask, old, ref, adv), jnp.asarray(sampler), jnp.asarray(rewards),
                                  jnp.asarray(kl), jnp.asarray(ended), settings)
    groups = rewards.reshape(B, G)
    expected = {"reward_mean": rewards.mean(), "reward_std": rewards.std(),
                "group_reward_std": np.mean([statistics.stdev(g) for g in groups]),
                "zero_std_groups": 1 / B, "response_length": mask.sum(1).mean(), "eos_rate": ended.mean(),
                "logprob_mismatch": np.abs(sampler - old)[mask].mean(), "kl": kl.mean()}
    assert expected["logprob_mismatch"] == pytest.approx(1e-3, rel=1e-3)
    for key, value in expected.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-4), key


def test_loss_averages_equal_loops_and_add_up_over_micro_batches():
    rng = np.random.default_rng(3)
    losses = rng.normal(size=(R, N)).astype(np.float32)
    mask = _prefix_mask(rng, R, N)
    losses[~mask] = np.nan  # padding must not leak
    tokens = float(mask.sum())
    for mode in ("sequence", "token", "sum"):
        whole = float(GM.average_losses(jnp.asarray(losses), jnp.asarray(mask), mode))
        assert whole == pytest.approx(_loop_average(losses, mask, mode), rel=1e-5), mode
        halves = sum(float(GM.average_losses(jnp.asarray(losses[rows]), jnp.asarray(mask[rows]), mode, rows=R,
                                             tokens=tokens)) for rows in (slice(0, R // 2), slice(R // 2, R)))
        assert halves == pytest.approx(whole, rel=1e-5), mode
    assert float(GM.average_losses(jnp.asarray(losses), jnp.asarray(mask), "token")) != pytest.approx(
        float(GM.average_losses(jnp.asarray(losses), jnp.asarray(mask), "sequence")), rel=1e-3)
    empty = mask.copy()
    empty[1] = False  # a response without a token adds 0 and still counts as a response
    expected = sum(losses[r][empty[r]].mean() for r in range(R) if empty[r].any()) / R
    assert float(GM.average_losses(jnp.asarray(losses), jnp.asarray(empty), "sequence")) == pytest.approx(expected)


def _batch(tokens, mask, old, ref, adv) -> group.GroupBatch:
    zeros = jnp.zeros((R, P), jnp.int32)
    return group.GroupBatch(zeros, zeros.astype(bool), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(old),
                            jnp.asarray(ref), jnp.asarray(adv))


def _token_stats(logits_RNV, tokens, mask) -> TokenStats:
    """What the policy's forward gives the objective, from given logits."""
    return TokenStats(jnp.where(mask, token_logprobs(logits_RNV, jnp.asarray(tokens)), 0.0), token_entropy(logits_RNV))


@pytest.mark.parametrize("algorithm, clip_ratio, average", [
    ("grpo", 0.2, "sequence"), ("grpo", 0.2, "token"), ("rloo", 0.0, "sequence"), ("rloo", 0.2, "sequence")])
def test_the_objective_equals_a_loop_with_k3_by_its_formula(algorithm, clip_ratio, average):
    """GRPO: the clipped surrogate (upper clip 0.28) plus kl_coef x k3, k3 = exp(ref - logp) - (ref - logp) - 1,
    averaged per response or per token; RLOO: -A r (or the clipped surrogate) summed over each response's
    tokens, averaged over responses, no KL term (it is in RLOO's reward)."""
    logits, tokens, mask, logp, old, ref, adv = _random_rows(4)
    settings = group.GroupSettings(algorithm=algorithm, group_size=G, clip_ratio=clip_ratio, clip_ratio_high=0.28,
                                   kl_coef=0.3, loss_average=average)
    loss, stats = group.objective(_token_stats(jnp.asarray(logits), tokens, mask), _batch(tokens, mask, old, ref, adv),
                                  settings)
    low, high = (None, None) if algorithm == "rloo" and not clip_ratio else (0.2, 0.28 if algorithm == "grpo" else 0.2)
    per_token = _loop_token_losses(logp, old, adv, mask, low, high)
    if algorithm == "grpo":
        d = np.float64(ref) - logp
        k3 = np.where(mask, np.exp(d) - d - 1, 0.0)
        assert np.all(k3[mask] >= 0) and k3[mask].max() > 1e-2
        per_token = per_token + 0.3 * k3
    expected = _loop_average(per_token, mask, average if algorithm == "grpo" else "sum")
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(stats["policy_loss"]) == float(loss)


def test_reinforce_gradient_is_minus_advantage_times_the_log_prob_gradient():
    """RLOO without clipping at ratio 1: the gradient of the loss is -mean_i A_i grad log pi(y_i)."""
    logits, tokens, mask, logp, _, ref, adv = _random_rows(5)
    settings = group.GroupSettings(algorithm="rloo", group_size=G, clip_ratio=0.0, kl_coef=0.3)
    batch = _batch(tokens, mask, logp, ref, adv)  # old = current: ratio 1
    grad = jax.grad(lambda x: group.objective(_token_stats(x, tokens, mask), batch, settings)[0])(jnp.asarray(logits))

    def reinforce(x):
        logp_RN = jnp.take_along_axis(jax.nn.log_softmax(x, -1), jnp.asarray(tokens)[..., None], -1)[..., 0]
        return -jnp.mean(jnp.asarray(adv) * jnp.sum(jnp.where(jnp.asarray(mask), logp_RN, 0.0), axis=1))

    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(reinforce)(jnp.asarray(logits))), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("average", ["sequence", "token"])
def test_the_grpo_gradient_is_that_of_the_surrogate_plus_k3(average):
    """The gradient of GRPO's objective with respect to the logits equals that of the clipped surrogate plus
    kl_coef x k3 written out here: the KL term pulls toward the reference through the policy's log-probs."""
    logits, tokens, mask, _, old, ref, adv = _random_rows(6)
    settings = group.GroupSettings(algorithm="grpo", group_size=G, clip_ratio=0.2, clip_ratio_high=0.28,
                                   kl_coef=0.3, loss_average=average)
    batch = _batch(tokens, mask, old, ref, adv)
    m = jnp.asarray(mask, jnp.float32)

    def written_out(x, kl_coef):
        logp = jnp.take_along_axis(jax.nn.log_softmax(x, -1), jnp.asarray(tokens)[..., None], -1)[..., 0]
        ratio, a = jnp.exp(logp - old), jnp.asarray(adv)[:, None]
        d = ref - logp
        per_token = (jnp.maximum(-ratio * a, -jnp.clip(ratio, 0.8, 1.28) * a) + kl_coef * (jnp.exp(d) - d - 1)) * m
        return (per_token.sum() / m.sum() if average == "token" else
                jnp.mean(per_token.sum(1) / m.sum(1)))

    x = jnp.asarray(logits)
    grad = jax.grad(lambda x: group.objective(_token_stats(x, tokens, mask), batch, settings)[0])(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(written_out)(x, 0.3)), rtol=1e-4, atol=1e-7)
    kl_part = np.asarray(jax.grad(written_out)(x, 0.3) - jax.grad(written_out)(x, 0.0))
    assert np.abs(kl_part).max() > 1e-3  # the KL term's own gradient is there to be lost


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_the_rollouts_kl_is_k1_from_the_policy_to_the_reference(algorithm):
    """With a reference other than the policy, the rollout's log-probs are each model's own (at the sampling
    temperature) and its KL (GRPO's metric, RLOO's reward penalty) is sum(logp - logp_ref) per response."""
    from rlhf_jax.models.sampling import teacher_forced_logprobs

    models, settings, _, rewards_fn, _ = _program(algorithm)
    state, frozen, ids, mask = _setup(models)
    frozen = frozen._replace(ref_params=jax.tree.map(lambda x: x * 1.3, frozen.ref_params))
    ids_RP, mask_RP = group.repeat_prompts(ids, mask, settings)
    batch, stats = jax.jit(lambda s, f, i, m, r: group.rollout(s, f, i, m, r, models, settings, rewards_fn)[:2])(
        state, frozen, ids_RP, mask_RP, jax.random.key(3))
    inputs = (batch.prompt_ids_RP, batch.prompt_mask_RP, batch.tokens_RN, batch.mask_RN)
    forced = jax.jit(lambda p: teacher_forced_logprobs(models.policy, p, *inputs, models.sampling.temperature))
    old, ref = np.asarray(forced(state.policy.params)), np.asarray(forced(frozen.ref_params))
    real = np.asarray(batch.mask_RN, bool)
    np.testing.assert_allclose(np.asarray(batch.old_logprobs_RN)[real], old[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.ref_logprobs_RN)[real], ref[real], rtol=1e-5, atol=1e-5)
    kl = np.where(real, old - ref, 0.0).sum(1).mean()
    assert float(stats["kl"]) == pytest.approx(kl, rel=1e-4) and abs(kl) > 0.05


# ------------------------------------------------------------------------------------------------ one iteration


class WordTokenizer:
    """Token i decodes to the word "t{i}"; nothing is skipped, so a leaked EOS or padding token would show."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split() if w[:1] == "t" and w[1:].isdigit()]}


def even_share(prompts, responses):
    """A reward function preferring the even token ids: their share of the response's tokens."""
    return [sum(int(w[1:]) % 2 == 0 for w in r.split()) / max(len(r.split()), 1) for r in responses]


@functools.cache
def _program(algorithm: str, no_eos_penalty: float | None = None):
    """(models, settings, the reward function's calls, the jitted iteration) of a tiny model with 2 epochs of
    2 minibatches of 2 micro-batches, the reward function `even_share` through the stage's host wrapper; sampled at
    temperature 0.7, so that a model scored at another temperature than the sampler's shows."""
    calls = []

    def recorded(prompts, responses):
        calls.append((prompts, responses))
        return even_share(prompts, responses)

    optim = OptimSection(lr=1e-2, schedule="constant", grad_clip=1.0)
    models = group.GroupModels(policy=make_model(CFG), policy_opt=steps.make_optimizer(optim, 100),
                               sampling=SamplingParams(N, temperature=0.7, eos_ids=EOS_IDS, pad_id=PAD_ID))
    settings = group.GroupSettings(algorithm=algorithm, group_size=G, epochs=2, minibatches=2, accum=2, samples=R,
                                   clip_ratio=0.2 if algorithm == "grpo" else 0.0, kl_coef=0.01,
                                   no_eos_penalty=no_eos_penalty)
    rewards_fn = RewardFunction(recorded, f"{algorithm}.reward_function=test", WordTokenizer(), EOS_IDS)
    step = jax.jit(lambda s, f, i, m: group.iteration(s, f, i, m, models=models, settings=settings,
                                                      rewards_fn=rewards_fn), donate_argnums=0)
    return models, settings, calls, rewards_fn, step


def _setup(models, seed: int = 0):
    policy = init_params(models.policy, jax.random.key(seed))
    state = group.init_state(policy, models, jax.random.key(seed + 1))
    frozen = group.Frozen(ref_params=jax.tree.map(jnp.copy, policy))  # a copy: the state is donated
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, P + 1, B)
    mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    ids = np.where(mask, rng.integers(4, CFG.vocab_size, (B, P)), PAD_ID).astype(np.int32)
    return state, frozen, jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_first_minibatch_ratio_is_exactly_one(algorithm):
    models, settings, _, rewards_fn, step = _program(algorithm)
    state, frozen, ids, mask = _setup(models)
    key = np.asarray(jax.random.key_data(state.rng))
    state, metrics = step(state, frozen, ids, mask)
    assert rewards_fn.problem is None
    # the key moves on: the next iteration samples other responses and shuffles its minibatches otherwise
    assert not np.array_equal(np.asarray(jax.random.key_data(state.rng)), key)
    metrics.pop("samples")
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["first_ratio_max"] == 1.0 and metrics["first_ratio_min"] == 1.0, metrics
    assert metrics["first_clip_frac"] == 0.0
    assert metrics["ratio_max"] > 1.0 > metrics["ratio_min"]  # the later steps see a policy that moved
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert abs(metrics["kl"]) < 1e-5  # the reference is the policy itself before the update
    assert metrics["logprob_mismatch"] < 1e-5
    assert int(state.policy.step) == 4  # 2 epochs x 2 minibatches


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_no_eos_penalty_replaces_the_reward_of_exactly_the_rows_that_never_ended(algorithm):
    models, settings, calls, rewards_fn, step = _program(algorithm, no_eos_penalty=-5.0)
    state, frozen, ids, mask = _setup(models, seed=3)
    calls.clear()
    _, metrics = step(state, frozen, ids, mask)
    (prompts, responses), = calls
    samples = jax.tree.map(np.asarray, metrics["samples"])
    ended = np.isin(samples["tokens"], EOS_IDS).any(1)
    assert 0 < ended.sum() < len(ended), ended  # rows of both kinds
    expected = np.where(ended, np.asarray(even_share(prompts, responses)), -5.0)
    np.testing.assert_allclose(samples["reward"], expected, rtol=1e-6)
    assert float(metrics["reward_mean"]) == pytest.approx(expected.mean(), rel=1e-5)


def test_the_reward_function_sees_exactly_the_decoded_responses_cut_at_eos():
    """Row by row: the prompt's real tokens, and the response's tokens before its first EOS (none of the EOS, none
    of the padding after it), decoded independently of the stage's code from the rows the iteration returns; the
    rewards are the function's, row by row, and groups are consecutive rows of one prompt."""
    models, settings, calls, rewards_fn, step = _program("grpo")
    state, frozen, ids, mask = _setup(models, seed=3)
    calls.clear()
    _, metrics = step(state, frozen, ids, mask)
    (prompts, responses), = calls
    samples = jax.tree.map(np.asarray, metrics["samples"])
    expected_prompts, expected_responses, cut = [], [], []
    for row in range(R):
        expected_prompts.append(" ".join(f"t{i}" for i in np.asarray(ids)[row // G][np.asarray(mask)[row // G]]))
        tokens = samples["tokens"][row].tolist()
        ends = [t for t, token in enumerate(tokens) if token in EOS_IDS]
        cut.append(ends[0] if ends else N)
        expected_responses.append(" ".join(f"t{i}" for i in tokens[:cut[-1]]))
    assert prompts == expected_prompts and responses == expected_responses
    assert 0 < sum(c < N for c in cut) < R, cut  # rows that ended (padding after them) and rows that did not
    assert all(samples["tokens"][row][cut[row] + 1:].tolist() == [PAD_ID] * (N - cut[row] - 1) for row in range(R))
    rewards = np.asarray(even_share(prompts, responses))
    np.testing.assert_allclose(samples["reward"], rewards, rtol=1e-6)
    assert rewards_fn.problem is None
    groups = [list(rewards[b * G:(b + 1) * G]) for b in range(B)]
    expected = {"reward_mean": rewards.mean(), "reward_std": rewards.std(),
                "group_reward_std": np.mean([statistics.stdev(g) for g in groups]),
                "zero_std_groups": np.mean([len(set(g)) == 1 for g in groups]),
                "response_length": samples["mask"].sum(1).mean(), "eos_rate": np.mean([c < N for c in cut])}
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_the_reward_models_scores_of_a_group_with_one_prompt_pass_are_each_rows_own():
    """The reward model's score of each row (its normalisation applied), each group's prompt run once, against the
    scores of every row's whole [prompt | response]: responses of every length, one of them empty."""
    from rlhf_jax.rl.scoring import reward_scores

    model = make_model(CFG, head="scalar")
    params = init_params(model, jax.random.key(3))
    rng = np.random.default_rng(8)
    prompt_mask = np.arange(P)[None, :] >= rng.integers(0, P, (B, 1))
    prompts = np.where(prompt_mask, rng.integers(4, CFG.vocab_size, (B, P)), PAD_ID)
    mask = _prefix_mask(rng, R, N)
    mask[1] = False  # an empty response: scored at the prompt's last token
    rows = (jnp.asarray(np.repeat(prompts, G, 0), jnp.int32), jnp.asarray(np.repeat(prompt_mask, G, 0)),
            jnp.asarray(np.where(mask, rng.integers(4, CFG.vocab_size, (R, N)), PAD_ID), jnp.int32), jnp.asarray(mask))
    score = jax.jit(lambda p, group: reward_scores(model, p, 2.0, -0.5, *rows, group=group), static_argnums=1)
    own, shared = np.asarray(score(params, 1)), np.asarray(score(params, G))
    np.testing.assert_allclose(shared, own, atol=1e-5)
    assert np.std(own) > 1e-3


def test_first_step_through_the_rollouts_forward_equals_a_direct_gradient():
    """The first optimizer step's backward runs through the rollout's own forward of its first micro-batch
    (`FirstForward`) and the other micro-batch through its own, each group's prompt pass run once
    (`share_prompts`); with plain SGD at lr 1 the step moves the params by exactly minus the gradient of the whole
    minibatch's loss (k3 to a reference that differs included), computed directly in one piece, every row through
    its own whole pass."""
    import optax

    from rlhf_jax.rl.scoring import response_token_stats

    settings = group.GroupSettings(algorithm="grpo", group_size=G, epochs=1, minibatches=1, accum=2, kl_coef=0.5,
                                   loss_average="sequence")
    models = group.GroupModels(policy=make_model(CFG), policy_opt=optax.sgd(1.0),
                               sampling=SamplingParams(N, temperature=0.7, eos_ids=(1,), pad_id=PAD_ID))
    params = init_params(models.policy, jax.random.key(0))
    ref = jax.tree.map(lambda x: x * 1.1, params)
    rng = np.random.default_rng(6)
    mask = _prefix_mask(rng, R, N)
    prompt_mask = np.arange(P)[None, :] >= rng.integers(0, P, (B, 1))  # left-padded, one token at least
    prompts = np.where(prompt_mask, rng.integers(4, CFG.vocab_size, (B, P)), PAD_ID)
    responses = (jnp.asarray(np.repeat(prompts, G, 0), jnp.int32), jnp.asarray(np.repeat(prompt_mask, G, 0)),
                 jnp.asarray(np.where(mask, rng.integers(4, CFG.vocab_size, (R, N)), PAD_ID), jnp.int32),
                 jnp.asarray(mask))
    advantages = jnp.asarray(rng.normal(size=R), jnp.float32)

    @jax.jit
    def first_step(params, ref):
        state = group.init_state(params, models, jax.random.key(0))
        forced, first = group.teacher_force(state, group.Frozen(ref), responses, models, settings, group.Runtime())
        batch = group.GroupBatch(*responses, forced.old_logprobs_RN, forced.ref_logprobs_RN, advantages)
        in_order = group.group_rows(jnp.arange(B)[None], settings)  # as teacher_force takes them by default
        policy, _ = group.update(state.policy, batch, in_order, models, settings, group.Runtime(), first)
        return policy.params, batch

    moved_params, batch = first_step(params, ref)
    direct = jax.jit(jax.grad(lambda p: group.objective(response_token_stats(models.policy, p, *responses, 0.7),
                                                        batch, settings)[0]))(params)
    for before, after, grad in zip(jax.tree.leaves(params), jax.tree.leaves(moved_params), jax.tree.leaves(direct)):
        np.testing.assert_allclose(np.asarray(before) - np.asarray(after), np.asarray(grad), rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(direct)) > 1e-3  # a gradient that moves things


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_a_minibatch_step_averages_over_its_own_rows_and_tokens(average):
    """With 2 minibatches (of 2 micro-batches each), the first optimizer step's loss and stats are means over
    that minibatch's responses and real tokens, not the whole batch's: with plain SGD at lr 1 it moves the params
    by minus the gradient of the objective of those rows alone, and its approx_kl, clip_frac and entropy are
    numpy means over their real tokens."""
    import optax

    from rlhf_jax.rl.scoring import response_token_stats

    settings = group.GroupSettings(algorithm="grpo", group_size=G, epochs=1, minibatches=2, accum=2, kl_coef=0.0,
                                   loss_average=average, clip_ratio=0.1)
    models = group.GroupModels(policy=make_model(CFG), policy_opt=optax.sgd(1.0),
                               sampling=SamplingParams(N, temperature=0.7, eos_ids=(1,), pad_id=PAD_ID))
    params = init_params(models.policy, jax.random.key(0))
    rng = np.random.default_rng(9)
    mask = _prefix_mask(rng, R, N)
    prompt_mask = np.arange(P)[None, :] >= rng.integers(0, P, (B, 1))
    prompts = np.where(prompt_mask, rng.integers(4, CFG.vocab_size, (B, P)), PAD_ID)
    responses = (jnp.asarray(np.repeat(prompts, G, 0), jnp.int32), jnp.asarray(np.repeat(prompt_mask, G, 0)),
                 jnp.asarray(np.where(mask, rng.integers(4, CFG.vocab_size, (R, N)), PAD_ID), jnp.int32),
                 jnp.asarray(mask))
    forced = jax.jit(lambda p: response_token_stats(models.policy, p, *responses, 0.7))(params)
    old = forced.logprobs_BN + jnp.asarray(rng.normal(0.0, 0.2, (R, N)), jnp.float32)  # ratios away from 1
    batch = group.GroupBatch(*responses, old, None, jnp.asarray(rng.normal(size=R), jnp.float32))
    orders = group.group_rows(jnp.arange(B)[None], settings)  # (1 epoch, 2 minibatches, rows)
    first = np.asarray(orders[0, 0])
    assert len(first) == R // 2 and mask[first].sum() != mask.sum() / 2  # the halves differ in tokens

    policy = group.init_state(params, models, jax.random.key(0)).policy
    moved, steps_stats = jax.jit(lambda pol: group.update(pol, batch, orders[:, :1], models, settings))(policy)
    own = jax.tree.map(lambda x: x[first], batch)
    own_inputs = (own.prompt_ids_RP, own.prompt_mask_RP, own.tokens_RN, own.mask_RN)
    direct = jax.jit(jax.grad(lambda p: group.objective(response_token_stats(models.policy, p, *own_inputs, 0.7),
                                                        own, settings)[0]))(params)
    for before, after, grad in zip(jax.tree.leaves(params), jax.tree.leaves(moved.params), jax.tree.leaves(direct)):
        np.testing.assert_allclose(np.asarray(before) - np.asarray(after), np.asarray(grad), rtol=1e-4, atol=1e-6)

    real = mask[first]
    dlogp = np.asarray(forced.logprobs_BN)[first] - np.asarray(old)[first]
    advantages = np.asarray(batch.advantages_R)[first][:, None]
    ratio = np.exp(dlogp)
    clipped = -advantages * np.clip(ratio, 0.9, 1.1) > -advantages * ratio
    expected = {"approx_kl": 0.5 * np.square(dlogp)[real].mean(), "clip_frac": clipped[real].mean(),
                "entropy": np.asarray(forced.entropy_BN)[first][real].mean()}
    assert 0 < expected["clip_frac"] < 1
    for key, value in expected.items():
        assert float(steps_stats[key][0]) == pytest.approx(value, rel=1e-4), key


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_reward_function_preferring_some_tokens_raises_the_reward(algorithm):
    models, settings, _, rewards_fn, step = _program(algorithm)
    state, frozen, ids, mask = _setup(models, seed=5)
    rewards = []
    for _ in range(20):  # (the reward starts near 0.5 and ends above 0.9 on three seeds tried)
        state, metrics = step(state, frozen, ids, mask)
        rewards.append(float(metrics["reward_mean"]))
    assert rewards_fn.problem is None
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards


# ------------------------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def group_inputs(tmp_path_factory):
    """A tiny policy (HF dir), a reward model export made from it (random scalar head, with a normalisation) and
    a prompts dataset prepared through the data CLI."""
    from rlhf_jax.data import __main__ as data_cli
    from rlhf_jax.models.checkpoint import load_model, save_model
    from rlhf_jax.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("grpo")
    tiny = build_tiny_model(root / "tiny", seed=0)
    loaded = load_model(tiny)
    params = training_state.with_head(loaded.params, loaded.cfg, "lm", "scalar", jax.random.key(1))
    rm = save_model(root / "rm", jax.tree.map(np.asarray, params), loaded.cfg, "scalar", tiny,
                    extra={"reward_norm": {"gain": 2.0, "bias": 0.5}})
    words = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish"]
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the {a} {b}"}) + "\n" for a in words for b in words))
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(src), "--data-dir", str(root / "data"),
                          "--name", "asks"]) == 0
    return {"root": root, "tiny": tiny, "rm": rm, "data": root / "data"}


def _args(inputs, run_dir, stage, *extra):
    return [f"stage={stage}", f"run_dir={run_dir}", f"model.path={inputs['tiny']}", f"data.dir={inputs['data']}",
            "data.name=asks", "data.max_prompt_tokens=12", "sampling.max_new_tokens=8", "sampling.temperature=0.7",
            "train.batch_size=4", f"{stage}.group_size=4", f"{stage}.minibatches=2", "train.log_every=1",
            "optim.lr=1e-3", *extra]


METRIC_KEYS = {"reward_mean", "reward_std", "group_reward_std", "zero_std_groups", "kl", "entropy",
               "response_length", "eos_rate", "clip_frac", "approx_kl", "policy_loss", "grad_norm", "first_ratio_max",
               "first_ratio_min", "rollout_s", "update_s", "episodes_per_s"}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_run(group_inputs):
    """4 grpo iterations against the reward model, checkpoints at steps 2 and 4, one group of samples every 2:
    (run dir, argv, stdout)."""
    run_dir = group_inputs["root"] / "grpo_run"
    argv = _args(group_inputs, run_dir, "grpo", f"grpo.reward_model={group_inputs['rm']}", "train.steps=4",
                 "train.save_every=2", "grpo.samples_every=2")
    rc, out, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-2000:]
    return run_dir, argv, out


def test_grpo_stage_with_a_reward_model(grpo_run):
    """Every key logged each iteration, the first ratio exactly 1 on the mesh, samples (one group) every 2
    iterations, a policy export and summary.json."""
    from rlhf_jax.models.checkpoint import load_model

    run_dir, _, out = grpo_run
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(m["stage"] == "grpo" for m in lines)
    assert all(METRIC_KEYS <= set(m) | {"episodes_per_s"} for m in lines), METRIC_KEYS - set(lines[0])
    assert "episodes_per_s" not in lines[0]  # the first step's window is its compilation
    assert lines[0]["first_ratio_max"] == 1.0 == lines[0]["first_ratio_min"] and abs(lines[0]["kl"]) < 1e-5
    assert lines[-1]["episodes_per_s"] > 0 and lines[-1]["kl"] != 0.0
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 4 + [4] * 4
    assert all(len({s["prompt"] for s in samples if s["step"] == step}) == 1 for step in (2, 4))  # one group
    assert all("about the" in s["prompt"] and isinstance(s["response"], str) and np.isfinite(s["reward"])
               for s in samples)
    policy = load_model(run_dir / "export")
    assert policy.head == "lm" and policy.extra.get("role") == "policy"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["steps"] == 4 and json.loads(out.strip().splitlines()[-1]) == summary


def test_grpo_stage_resumes_bitwise(grpo_run, tmp_path):
    """The run resumed from its step-2 checkpoint ends bitwise where it ended, with the same metrics and
    samples."""
    from rlhf_jax.models.checkpoint import load_model

    straight, argv, _ = grpo_run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for gone in ("checkpoints/4", "export", "summary.json"):
        shutil.rmtree(resumed / gone) if (resumed / gone).is_dir() else (resumed / gone).unlink()
    rc, _, err = run_quietly(main_cli.main, [a.replace(str(straight), str(resumed)) for a in argv])
    assert rc == 0 and "resumed from" in err and "at step 2" in err, err[-2000:]
    for a, b in zip(jax.tree.leaves(load_model(straight / "export").params),
                    jax.tree.leaves(load_model(resumed / "export").params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    deterministic = lambda run: [{k: m[k] for k in ("step", "reward_mean", "kl", "policy_loss", "grad_norm")}
                                 for m in _metrics(run)]
    assert deterministic(resumed) == deterministic(straight)
    assert (resumed / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


def test_rloo_stage_with_a_reward_function(group_inputs, tmp_path, capfd):
    """The reward function gets every iteration's B x G stored prompts and decoded responses (none with the EOS
    text), and its values are the rewards written to samples.jsonl. Its callback reads rows split over the 8 devices
    without XLA's warning that it had to replicate them (printed by the compiler, not by Python)."""
    grpo_fixtures.CALLS.clear()
    run_dir = tmp_path / "rloo"
    rc, _, err = run_quietly(main_cli.main, _args(group_inputs, run_dir, "rloo", "rloo.reward_function="
                                                  "grpo_fixtures:recorded", "train.steps=2", "rloo.samples_every=1",
                                                  f"runtime.compile_cache={tmp_path / 'xla'}"))  # compiled here
    assert rc == 0, err[-2000:]
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2] and all(METRIC_KEYS <= set(m) | {"episodes_per_s"} for m in lines)
    assert lines[1]["episodes_per_s"] > 0
    assert lines[0]["first_ratio_max"] == 1.0 == lines[0]["first_ratio_min"]
    assert len(grpo_fixtures.CALLS) == 2 and all(len(p) == len(r) == 16 for p, r in grpo_fixtures.CALLS)
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    for step, (prompts, responses) in enumerate(grpo_fixtures.CALLS, start=1):
        assert all("about the" in p for p in prompts) and len(set(prompts)) <= 4
        assert all(prompts[b * 4:(b + 1) * 4] == [prompts[b * 4]] * 4 for b in range(4))  # groups of one prompt
        assert not any("</s>" in r or "<|endoftext|>" in r for r in responses)
        rows = [s for s in samples if s["step"] == step]
        assert [s["response"] for s in rows] == responses[:4]
        # samples.jsonl shows the prompt the model read (cut to data.max_prompt_tokens), the function its whole text
        assert all(p.endswith(s["prompt"]) for p, s in zip(prompts, rows))
        assert [s["reward"] for s in rows] == [-float(len(r)) for r in responses[:4]]


def test_a_reward_function_gets_each_prompt_as_stored_with_its_metadata(group_inputs, tmp_path):
    """Prompts longer than data.max_prompt_tokens are cut for the model; the function gets each row's prompt as
    the dataset stores it (what eval.gold gets too), the answer it checks in the row's metadata, and whether each
    response ended."""
    from rlhf_jax.data import __main__ as data_cli

    words = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish"]
    stored = {f"Please answer plainly and in very few words: what is the {a} {b} like?": {"answer": [a, b]}
              for a in words for b in words}
    src = tmp_path / "meta.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "metadata": m}) + "\n" for p, m in stored.items()))
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(src), "--data-dir", str(tmp_path / "data"),
                          "--name", "meta"]) == 0
    grpo_fixtures.CALLS.clear()
    run_dir = tmp_path / "grpo"
    argv = [a.replace(str(group_inputs["data"]), str(tmp_path / "data")).replace("data.name=asks", "data.name=meta")
            for a in _args(group_inputs, run_dir, "grpo", "grpo.reward_function=grpo_fixtures:recorded_with_metadata",
                           "train.steps=1", "grpo.samples_every=1")]
    rc, _, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-2000:]
    [(prompts, responses, metadata, ended)] = grpo_fixtures.CALLS
    assert len(prompts) == len(responses) == len(metadata) == len(ended) == 16
    assert all(stored[p] == m for p, m in zip(prompts, metadata)) and len(set(prompts)) == 4
    assert all(prompts[b * 4:(b + 1) * 4] == [prompts[b * 4]] * 4 for b in range(4))  # groups of one prompt
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"] in prompts[0] and s["prompt"] != prompts[0] for s in samples)  # the model read it cut
    assert all(isinstance(e, bool) for e in ended)


def test_a_signature_the_call_cannot_satisfy_is_refused_before_any_work_and_a_near_miss_warned(capsys):
    from rlhf_jax.errors import UserError
    from rlhf_jax.runtime import plugins

    def misspelt(prompts, responses, metdata):
        return []

    def too_few(prompts):
        return []

    def defaulted(prompts, responses, metdata=None, ended=None, *, seed=0):
        return []

    offered = ("ended", "metadata")
    with pytest.raises(UserError) as caught:
        plugins.check_signature(misspelt, "grpo.reward_function=m:misspelt", ("prompts", "responses"), offered)
    assert str(caught.value) == ("grpo.reward_function=m:misspelt: misspelt(prompts, responses, metdata) cannot be "
                                 "called with (prompts, responses) and the keywords it names of ended, metadata: "
                                 "missing a required argument: 'metdata'")
    with pytest.raises(UserError, match=r"too_few\(prompts\) cannot be called with \(prompts, responses\).*: too many "
                                        "positional arguments"):
        plugins.check_signature(too_few, "k=m:too_few", ("prompts", "responses"), offered)
    for _ in range(2):  # a stage checks its config twice: one warning
        plugins.check_signature(defaulted, "k=m:defaulted", ("prompts", "responses"), offered)
        plugins.check_signature(lambda p, r, *, ended, metadata=None: [], "k=m:ok", ("prompts", "responses"), offered)
    assert capsys.readouterr().err == ("warning: k=m:defaulted: parameter 'metdata' is never given; did you mean "
                                       "'metadata'?\n")


def test_a_reward_function_the_call_cannot_satisfy_stops_the_stage_before_compiling(group_inputs, tmp_path):
    run_dir = tmp_path / "run"
    rc, _, err = run_quietly(main_cli.main, _args(group_inputs, run_dir, "grpo",
                                                  "grpo.reward_function=grpo_fixtures:misspelt", "train.steps=1"))
    assert rc == 2 and err.strip().splitlines()[-1] == (
        "error: grpo.reward_function=grpo_fixtures:misspelt: misspelt(prompts, responses, metdata) cannot be called "
        "with (prompts, responses) and the keywords it names of ended, metadata: missing a required argument: "
        "'metdata'"), err[-2000:]
    assert not (run_dir / "checkpoints").exists()


def test_ctrl_c_inside_user_code_stays_the_operators():
    from rlhf_jax.runtime import plugins

    def interrupted(prompts, responses):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plugins.call(interrupted, "grpo.reward_function=m:f", [], [])


def test_a_second_signal_stops_at_once_while_the_reward_function_runs(group_inputs, tmp_path):
    """The program waits for the reward function inside XLA: waited for there, the main thread heard no signal
    until the function returned (a hanging judge could only be killed)."""
    from compile_helpers import subprocess_env

    called = tmp_path / "called"
    argv = [sys.executable, "-m", "rlhf_jax.main", *_args(
        group_inputs, tmp_path / "slow", "grpo", "grpo.reward_function=grpo_fixtures:slow", "train.steps=2",
        "train.batch_size=4", "grpo.group_size=2", "grpo.minibatches=1", "grpo.kl_coef=0")]
    tests = Path(__file__).parent
    env = {**subprocess_env(), "RLHF_TEST_CALLED": str(called),
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not called.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-2000:]
                time.sleep(0.1)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=50)  # the function sleeps 60 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    last = (tmp_path / "err").read_text().strip().splitlines()[-1]
    assert proc.returncode == 4 and time.monotonic() - start < 50, last
    assert last == "interrupted again: stopped at once; rerun the same command to resume from the last complete " \
                   "checkpoint"


@pytest.mark.parametrize("stage, function, fragment", [
    ("rloo", "one_short", "rloo.reward_function=grpo_fixtures:one_short: returned 7 values for 8 responses"),
    ("grpo", "raises", "grpo.reward_function=grpo_fixtures:raises: raised ValueError: cannot score these"),
    ("grpo", "not_finite", "grpo.reward_function=grpo_fixtures:not_finite: returned 1 values for 8 responses "
                           "that are not finite in float32"),
], ids=["one_short", "raises", "not_finite"])
def test_reward_function_mistakes_stop_the_stage_in_one_line(group_inputs, tmp_path, stage, function, fragment):
    run_dir = tmp_path / "bad"
    unread = tmp_path / "no_such_reference"  # with kl_coef 0 nothing reads it: a warning, not an error
    argv = _args(group_inputs, run_dir, stage, f"{stage}.reward_function=grpo_fixtures:{function}", "train.steps=2",
                 "train.batch_size=4", f"{stage}.group_size=2", f"{stage}.minibatches=1", f"{stage}.kl_coef=0",
                 f"{stage}.reference={unread}")
    rc, _, err = run_quietly(main_cli.main, argv)
    assert (f"warning: {stage}.reference={unread} is not read: with {stage}.kl_coef=0 there is no KL to a reference"
            in err.splitlines()), err
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1] and "(iteration 1)" in lines[-1], err
    assert "Traceback" not in err and "XlaRuntimeError" not in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "export").exists()


@pytest.mark.parametrize("overrides, fragment", [
    ([], "stage 'grpo' needs grpo.reward_model (a reward model export from the rm stage) or grpo.reward_function"),
    (["grpo.reward_model={rm}", "grpo.reward_function=grpo_fixtures:recorded"], "are both set"),
    (["grpo.reward_model={rm}", "grpo.minibatches=3"], "grpo.minibatches=3: the 16 responses of an iteration "
                                                       "(train.batch_size=4 x grpo.group_size=4) do not split"),
    (["grpo.reward_model={rm}", "grpo.minibatches=4"], "train.batch_size x grpo.group_size = 4 x 4 = 16 responses "
                                                       "must split into grpo.minibatches=4 minibatches divisible by "
                                                       "the 8 data-parallel devices"),
    (["grpo.reward_model={rm}", "optim.grad_accum_steps=2"], "minibatches of optim.grad_accum_steps=2 micro-batches"),
    (["grpo.reward_model={rm}", "grpo.minibatches=8"], "grpo.share_prompts keeps each prompt's group in one "
                                                       "micro-batch: train.batch_size=4 prompts do not split"),
    (["grpo.reward_function=nowhere_to_be_found:f"], "grpo.reward_function='nowhere_to_be_found:f': cannot import"),
    (["grpo.reward_function=grpo_fixtures:missing"], "grpo_fixtures has no function 'missing'"),
    (["grpo.reward_model={tiny}"], "a language model, expected a scalar-head"),
    (["grpo.reward_model=/nonexistent_rm"], "error: grpo.reward_model=/nonexistent_rm: does not exist"),
    (["grpo.reward_model={rm}", "grpo.reference=/nonexistent_ref"], "error: grpo.reference=/nonexistent_ref: does "
                                                                    "not exist"),
    (["grpo.reward_model={rm}", "sampling.top_k=5"], "stage 'grpo' trains on its own samples"),
    (["grpo.reward_model={rm}", "data.name="], "stage 'grpo' needs data.name"),
    (["stage=rloo", "rloo.reward_model={rm}", "rloo.group_size=1"], "'rloo.group_size' must be >= 2"),
    (["stage=rloo"], "stage 'rloo' needs rloo.reward_model"),
])
def test_bad_config_fails_in_one_line(group_inputs, tmp_path, overrides, fragment):
    run_dir = tmp_path / "bad"
    argv = _args(group_inputs, run_dir, "grpo", "train.steps=2",
                 *[o.format(rm=group_inputs["rm"], tiny=group_inputs["tiny"]) for o in overrides])
    rc, _, err = run_quietly(main_cli.main, argv)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err and not run_dir.exists()


def test_a_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    from rlhf_jax.runtime import plugins

    (tmp_path / "rf_syntax.py").write_text("def f(p, r) return 1\n")
    (tmp_path / "rf_raises.py").write_text("import os\nraise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"^k='rf_syntax:f': importing rf_syntax raised SyntaxError: "
                                        r".*rf_syntax.py:1\)$"):
        plugins.function("rf_syntax:f", "k")
    with pytest.raises(UserError, match=r"^k='rf_raises:f': importing rf_raises raised RuntimeError: no GPU here "
                                        r"\(.*rf_raises.py:2\)$"):
        plugins.function("rf_raises:f", "k")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a value beyond float32 is reported, not warned about too
def test_the_reward_function_wrapper_records_each_mistake_and_returns_zeros():
    """What the callback does with a function that raises, returns the wrong length, strings, or NaN: zeros
    back to the program, the first problem kept for the host loop."""
    tokens = np.array([[5, 1, PAD_ID], [6, 7, 8]])
    args = (np.array([[4, 9]] * 2), np.array([[False, True]] * 2), tokens, tokens != PAD_ID)
    for fn, fragment in ((grpo_fixtures.raises, "raised ValueError: cannot score these"),
                         (grpo_fixtures.one_short, "returned 1 values for 2 responses"),
                         (lambda p, r: ["a", "b"], "returned a list whose value for response 0 is 'a'; expected 2 "
                                                   "numbers"),
                         (lambda p, r: (1.0, None), "returned a tuple whose value for response 1 is None"),
                         (lambda p, r: [[1.0, 2.0], [3.0, 4.0]], "expected a list of 2 numbers"),
                         (lambda p, r: ["1.5", "2"], "value for response 0 is '1.5'; expected 2 numbers"),
                         (lambda p, r: [[1.0], 2.0], "value for response 0 is [1.0]; expected 2 numbers"),
                         (lambda p, r: [np.float32(1.0), None], "value for response 1 is None"),  # 0-d: numbers
                         (lambda p, r: [0.0, 1.0, 2.0], "returned 3 values for 2 responses"),
                         (lambda p, r: [0.0, math.nan, math.inf], "returned 3 values"),
                         (lambda p, r: [1e39, 0.0], "not finite in float32 (the first: 1e+39 for response 0)"),
                         (lambda p, r: sys.exit(3), "raised SystemExit: 3"),
                         (grpo_fixtures.times_out, "raised FunctionTimedOut: took too long"),  # a BaseException
                         (lambda p, r: np.zeros((2, 2)), "returned a numpy ndarray of shape (2, 2), float64; "
                                                         "expected a list of 2 numbers"),  # one line, not numpy's
                         (lambda p, r: [0.0, math.nan], "not finite in float32 (the first: nan for response 1)"),
                         (grpo_fixtures.not_finite, "returned 1 values for 2 responses that are not finite in "
                                                    "float32 (the first: nan")):
        wrapper = RewardFunction(fn, "grpo.reward_function=m:f", WordTokenizer(), (1,))
        assert wrapper(*args).tolist() == [0.0, 0.0] and wrapper.problem.startswith("grpo.reward_function=m:f")
        assert fragment in wrapper.problem, wrapper.problem
        with pytest.raises(Exception, match="iteration 3"):
            wrapper.raise_if_failed({}, 3)
    # what is fine: bools, a model's (n, 1) scores, numpy and framework scalars
    for returned in ([True, False], np.array([[0.5], [2.0]]), [np.float32(0.5), jnp.float32(2.0)]):
        wrapper = RewardFunction(lambda p, r: returned, "grpo.reward_function=m:f", WordTokenizer(), (1,))
        got = wrapper(*args)
        assert wrapper.problem is None and got.dtype == np.float32, wrapper.problem
        assert got.tolist() == np.asarray(returned, np.float32).reshape(-1).tolist()
    seen = []
    wrapper = RewardFunction(lambda p, r: seen.append((p, r)) or [1, 2.5], "k=m:f", WordTokenizer(), (1,))
    assert wrapper(*args).tolist() == [1.0, 2.5] and wrapper.problem is None
    assert seen.pop() == (["t9", "t9"], ["t5", "t6 t7 t8"]) and not seen


def test_the_reward_function_is_told_what_its_signature_names_and_each_rows_stored_prompt():
    """`ended` (rows 0 and 2 end with the EOS, 1) and `metadata` reach a function whose signature names them,
    keyword-only too; a **kwargs wrapper that passes its arguments on gets neither. With the stage's batch set, row
    r's prompt is the batch's prompt r // G as stored; rows that are not the batch's prompts each repeated G times
    (tiled, other ids, another mask) are refused."""
    import functools

    tokens = np.array([[5, 1, PAD_ID], [6, 7, 8], [5, 1, PAD_ID], [9, 9, 9]])
    ids_BP, mask_BP = np.array([[4, 9], [3, 8]]), np.array([[False, True], [True, True]])
    rows = lambda order: (ids_BP[order], mask_BP[order], tokens, tokens != PAD_ID)
    repeated = rows([0, 0, 1, 1])
    seen = []

    def takes_none(prompts, responses):
        seen.append("none")
        return [0.0] * len(responses)

    def forwarding(*args, **kwargs):  # a decorator written without functools.wraps
        return takes_none(*args, **kwargs)

    for fn, expected in ((lambda p, r, ended: seen.append(ended) or [0] * 4, [True, False, True, False]),
                         (lambda p, r, *, ended: seen.append(ended) or [0] * 4, [True, False, True, False]),
                         (forwarding, "none"), (functools.wraps(takes_none)(forwarding), "none")):
        wrapper = RewardFunction(fn, "k=m:f", WordTokenizer(), (1,))
        wrapper(*repeated)
        assert wrapper.problem is None and seen.pop() == expected, wrapper.problem

    wrapper = RewardFunction(lambda p, r, metadata: seen.append((p, metadata)) or [0] * 4, "k=m:f", WordTokenizer(),
                             (1,))
    source = [{"prompt": b"Eight?", "metadata": b""}, {"prompt": b"other", "metadata": b"1"},
              {"prompt": b"Nine?", "metadata": b'{"answer":9}'}]
    batch = {"example_index": np.array([2, 0]), "prompt_ids": ids_BP, "prompt_mask": mask_BP}
    wrapper.set_batch(source, batch)
    wrapper(*repeated)
    assert wrapper.problem is None and seen.pop() == (["Nine?", "Nine?", "Eight?", "Eight?"],
                                                      [{"answer": 9}, {"answer": 9}, None, None])
    for other in (rows([0, 1, 0, 1]),  # tiled
                  (np.array([[4, 8], [4, 8], [3, 8], [3, 8]]), *repeated[1:]),  # another id
                  (np.array([[0, 9], [0, 9], [3, 8], [3, 8]]), np.ones((4, 2), bool), *repeated[2:])):  # a mask
        wrapper = RewardFunction(lambda p, r, metadata: seen.append(p) or [0] * 4, "k=m:f", WordTokenizer(), (1,))
        wrapper.set_batch(source, batch)
        assert wrapper(*other).tolist() == [0.0] * 4 and not seen
        assert "the 4 rows scored are not the 2 prompts of the batch" in wrapper.problem, wrapper.problem


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_every_setting_of_the_section_reaches_the_iteration(stage):
    """build_models fills GroupSettings from the stage's section, each key set away from its default; the reward
    model's normalisation from its export."""
    from rlhf_jax.config import load_config
    from rlhf_jax.plan.models import tiny_model_config
    from rlhf_jax.stages.grpo import build_models

    values = {"group_size": 2, "epochs": 3, "minibatches": 2, "clip_ratio": 0.15, "clip_ratio_high": 0.28,
              "kl_coef": 0.5, "scale_by_std": False, "loss_average": "token", "share_prompts": False,
              "no_eos_penalty": -2.5}
    section = getattr(load_config(None, [f"stage={stage}"]), stage)
    overrides = [f"{stage}.{key}={str(value).lower()}" for key, value in values.items() if hasattr(section, key)]
    cfg = load_config(None, [f"stage={stage}", "train.batch_size=8", "optim.grad_accum_steps=2", *overrides])
    _, settings = build_models(cfg, make_model(tiny_model_config()), None, 10, rollout_sampling(cfg, (1,)),
                               {"gain": 2.0, "bias": -1.0})
    section = getattr(cfg, stage)
    shared = [f.name for f in dataclasses.fields(group.GroupSettings) if hasattr(section, f.name)]
    assert len(shared) >= (10 if stage == "grpo" else 7), shared  # every numeric setting the section has
    assert all(getattr(settings, key) == getattr(section, key) == values[key] for key in shared), settings
    assert (settings.algorithm, settings.reward_gain, settings.reward_bias, settings.accum) == (stage, 2.0, -1.0, 2)


def test_the_reward_models_normalisation_is_applied(group_inputs, tmp_path):
    """rewards = gain * head + bias from the export's reward_norm: with gain 0 and bias 5 every reward is 5."""
    from rlhf_jax.models.checkpoint import load_model, save_model

    rm = load_model(group_inputs["rm"])
    flat = save_model(tmp_path / "rm_flat", jax.tree.map(np.asarray, rm.params), rm.cfg, "scalar",
                      group_inputs["tiny"], extra={"reward_norm": {"gain": 0.0, "bias": 5.0}})
    run_dir = tmp_path / "run"
    rc, _, err = run_quietly(main_cli.main, _args(group_inputs, run_dir, "rloo", f"rloo.reward_model={flat}",
                                                  "train.steps=1", "train.save_every=0", "rloo.samples_every=0"))
    assert rc == 0, err[-2000:]
    m, = _metrics(run_dir)
    assert (m["reward_mean"], m["reward_std"], m["zero_std_groups"]) == (5.0, 0.0, 1.0), m
