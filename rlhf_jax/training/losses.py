"""Pure array functions for the training objectives; each is tested against a brute-force loop."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position, from float32 logits."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, jnp.maximum(targets_BT, 0))


def next_token_nll(hidden_BTD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], ids_BT: jax.Array,
                           weight_BT: jax.Array, segment_ids_BT: jax.Array, chunk: int = 128
                           ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted NLL, sum of weights) for predicting ids[t+1] from position t's final hidden state. A
    target counts when its weight is set and it belongs to the same packed example as its context.
    No float32 B x T x V tensor: `logits_fn` (the LM head, x_BCD -> logits_BCV) and the cross-entropy run on
    `chunk` positions of every row at a time, and the backward pass recomputes each chunk's logits instead of
    keeping them. Chunks span all rows, so a batch-sharded step keeps every device busy. A chunk with no target
    (the left-padded prompts of an SFT batch that trains on responses only) skips the head both ways: at a real
    vocabulary the head is a quarter of a small model's FLOPs."""
    B, T, D = hidden_BTD.shape
    same_segment_BT = segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
    # position t predicts ids[t + 1]; the last position predicts nothing (weight 0), nor do the chunks' padding
    w_BT = jnp.pad(weight_BT[:, 1:].astype(jnp.float32) * same_segment_BT, ((0, 0), (0, 1)))
    targets_BT = jnp.pad(ids_BT[:, 1:], ((0, 0), (0, 1)))
    C = min(chunk, T)
    pad = -T % C
    chunks = lambda x_BT: jnp.moveaxis(jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
                                       .reshape(B, (T + pad) // C, C, *x_BT.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_nll(total, xs):
        x_BCD, targets_BC, w_BC = xs
        nll = lambda: -jnp.sum(token_logprobs(logits_fn(x_BCD), targets_BC) * w_BC)
        return total + jax.lax.cond(jnp.any(w_BC > 0), nll, lambda: jnp.zeros((), jnp.float32)), None

    total, _ = jax.lax.scan(chunk_nll, jnp.zeros((), jnp.float32),
                            (chunks(hidden_BTD), chunks(targets_BT), chunks(w_BT)))
    return total, jnp.sum(w_BT)


def ranking_loss(rewards_BK: jax.Array, pairs_BKK: jax.Array, weight_B: jax.Array | None = None) -> dict:
    """InstructGPT loss over all the comparisons of a prompt: pairs_BKK[b, i, j] counts how often response i
    was preferred to response j. Per prompt, the count-weighted mean over its pairs of -log sigmoid(r_i - r_j),
    so every prompt is one batch element whatever its number of pairs; then the mean over prompts with a pair.
    Returns the sums needed for exact accumulation across micro-batches and hosts, plus pair statistics."""
    pairs_BKK = pairs_BKK.astype(jnp.float32)
    margin_BKK = rewards_BK[:, :, None] - rewards_BK[:, None, :]
    n_pairs_B = pairs_BKK.sum((1, 2))
    has_pairs_B = (n_pairs_B > 0).astype(jnp.float32)
    if weight_B is not None:
        has_pairs_B = has_pairs_B * weight_B
    per_prompt_B = jnp.sum(pairs_BKK * jax.nn.softplus(-margin_BKK), (1, 2)) / jnp.maximum(n_pairs_B, 1.0)
    pair_w_BKK = pairs_BKK * has_pairs_B[:, None, None]
    return {
        "loss_sum": jnp.sum(per_prompt_B * has_pairs_B),
        "prompts": jnp.sum(has_pairs_B),
        "pairs": jnp.sum(pair_w_BKK),
        "correct": jnp.sum(pair_w_BKK * (margin_BKK > 0)),
        "margin_sum": jnp.sum(pair_w_BKK * margin_BKK),
    }


def last_token_values(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """The value at each row's last real token (rows are [left-padded prompt | right-padded response])."""
    T = mask_BT.shape[1]
    last_B = T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
    return jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]
