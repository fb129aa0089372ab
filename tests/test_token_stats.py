"""Response tokens' log-probs and entropies with the LM head in chunks (`rl.scoring.response_token_stats`): the
dense computation's values and gradients at every chunking, padding left at 0, and an entropy that is only a
metric (no full-vocabulary backward) unless it is asked to be differentiated."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.sampling import response_logits
from rlhf_jax.models.transformer import PAD_ID, init_params, make_model
from rlhf_jax.rl import scoring
from rlhf_jax.rl.ppo_math import token_entropy
from rlhf_jax.training.losses import token_logprobs

CFG = ModelConfig(family="gemma2", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48, max_position_embeddings=64, final_softcap=3.0, tie_embeddings=True)
B, P, N, T = 4, 5, 7, 0.7


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((B, P), bool)
    prompt_mask[1, :2] = False  # left padding
    lengths = np.array([7, 3, 1, 5])
    mask = np.arange(N)[None] < lengths[:, None]
    tokens = np.where(mask, rng.integers(0, CFG.vocab_size, (B, N)), PAD_ID).astype(np.int32)
    prompt = np.where(prompt_mask, rng.integers(0, CFG.vocab_size, (B, P)), PAD_ID).astype(np.int32)
    return prompt, prompt_mask, tokens, mask


def _dense(model, params, rows, vocab=None):
    """The oracle: float32 logits of every response position at once, the ids past `vocab` sliced off."""
    logits_BNV = response_logits(model, params, *rows, T)[..., :vocab]
    return jnp.where(rows[3], token_logprobs(logits_BNV, rows[2]), 0.0), token_entropy(logits_BNV)


# 1 position per chunk, 3 (and a remainder of 1), all 7; and with fewer tokenizer ids than vocabulary rows
@pytest.mark.parametrize("logit_rows, vocab", [(4, None), (12, None), (1024, None), (12, 80)])
def test_chunked_stats_and_gradients_are_the_dense_ones(logit_rows, vocab, monkeypatch):
    monkeypatch.setattr(scoring, "LOGIT_ROWS", logit_rows)
    model = make_model(CFG)
    params = init_params(model, jax.random.key(0))
    rows = _rows()
    if vocab is not None:
        rows = (*rows[:2], np.where(rows[3], rows[2] % vocab, PAD_ID).astype(np.int32), rows[3])
    stats = jax.jit(lambda p: scoring.response_token_stats(model, p, *rows, T, entropy_grad=True, vocab=vocab))(
        params)
    logprobs, entropy = jax.jit(lambda p: _dense(model, p, rows, vocab))(params)
    np.testing.assert_allclose(stats.logprobs_BN, logprobs, atol=1e-5)
    np.testing.assert_allclose(stats.entropy_BN, entropy, atol=1e-5)
    assert np.all(np.asarray(stats.logprobs_BN)[~rows[3]] == 0.0)

    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, B, N)), jnp.float32)
    objective = lambda lp, ent: jnp.sum(weights[0] * lp) + jnp.sum(weights[1] * ent * rows[3])
    chunked = jax.jit(jax.grad(lambda p: objective(*scoring.response_token_stats(model, p, *rows, T,
                                                                                 entropy_grad=True, vocab=vocab))))
    dense = jax.jit(jax.grad(lambda p: objective(*_dense(model, p, rows, vocab))))
    for a, b in zip(jax.tree.leaves(chunked(params)), jax.tree.leaves(dense(params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_entropy_is_a_metric_unless_asked_for_its_gradient():
    """Without entropy_grad the objective's gradient is the log-probs' alone and the program drops the entropy's
    full-vocabulary backward (XLA's FLOP count); with it, the entropy's gradient is there."""
    model = make_model(CFG)
    params = init_params(model, jax.random.key(0))
    rows = _rows(seed=2)

    def grad_of(entropy_grad, with_entropy=True):
        def loss(p):
            stats = scoring.response_token_stats(model, p, *rows, T, entropy_grad=entropy_grad)
            return jnp.sum(stats.logprobs_BN) + with_entropy * jnp.sum(stats.entropy_BN)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return jax.tree.leaves(compiled(params)), compiled.cost_analysis()["flops"]

    (metric, flops_metric), (plain, _), (bonus, flops_bonus) = grad_of(False), grad_of(False, False), grad_of(True)
    for a, b in zip(metric, plain):
        np.testing.assert_array_equal(a, b)
    assert flops_metric < flops_bonus - 2 * B * N * CFG.vocab_size, (flops_metric, flops_bonus)
    assert max(float(np.abs(a - b).max()) for a, b in zip(bonus, plain)) > 1e-3


@pytest.mark.parametrize("family, scan", [("gemma2", False), ("gemma3", True)])
def test_a_groups_shared_prompt_pass_gives_each_rows_own_pass(family, scan):
    """Rows in runs of G sharing a (left-padded) prompt: one prompt pass per run, its keys and values read by the
    run's responses (`group=G`), gives every row's own whole pass: log-probs, entropies and the gradient of an
    objective over them, with a window shorter than prompt + response (the responses' first tokens see the prompt
    through it) in a Python loop of layers and in a scan of mixed sliding and full layers."""
    from test_families import random_params, tiny

    G, b, P_, N_ = 3, 3, 6, 5
    cfg = tiny(family)
    model = make_model(cfg, scan_layers=scan)
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    if scan:
        from rlhf_jax.models.layer_stack import stack_layers
        params = stack_layers(params, cfg.n_layers)
    rng = np.random.default_rng(4)
    prompt_mask = np.arange(P_)[None] >= np.array([[0], [2], [5]])  # whole, padded, one token
    prompt = np.where(prompt_mask, rng.integers(4, cfg.vocab_size, (b, P_)), PAD_ID)
    mask = np.arange(N_)[None] < rng.integers(1, N_ + 1, (b * G, 1))
    rows = (jnp.asarray(np.repeat(prompt, G, 0), jnp.int32), jnp.asarray(np.repeat(prompt_mask, G, 0)),
            jnp.asarray(np.where(mask, rng.integers(4, cfg.vocab_size, (b * G, N_)), PAD_ID), jnp.int32),
            jnp.asarray(mask))
    weights = jnp.asarray(rng.normal(size=(2, b * G, N_)), jnp.float32)

    def objective(p, group):
        stats = scoring.response_token_stats(model, p, *rows, T, group=group)
        return jnp.sum(weights[0] * stats.logprobs_BN) + jnp.sum(weights[1] * stats.entropy_BN * rows[3]), stats

    (own, own_stats), own_grads = jax.jit(jax.value_and_grad(lambda p: objective(p, 1), has_aux=True))(params)
    (shared, stats), grads = jax.jit(jax.value_and_grad(lambda p: objective(p, G), has_aux=True))(params)
    np.testing.assert_allclose(stats.logprobs_BN, own_stats.logprobs_BN, atol=1e-5)
    np.testing.assert_allclose(stats.entropy_BN * rows[3], own_stats.entropy_BN * rows[3], atol=1e-5)
    for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(own_grads)):
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)
    assert np.abs(np.asarray(own_stats.logprobs_BN)).max() > 0.1
    assert float(shared) == pytest.approx(float(own), rel=1e-5)
