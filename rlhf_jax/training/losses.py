"""Pure array functions for the training objectives; each is tested against a brute-force loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position, from float32 logits."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, jnp.maximum(targets_BT, 0))


def next_token_nll(logits_BTV: jax.Array, ids_BT: jax.Array, weight_BT: jax.Array,
                   segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted NLL, sum of weights) for predicting ids[t+1] from position t. A target counts when its
    weight is set and it belongs to the same packed example as its context."""
    same_segment_BT = segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
    w_BT = weight_BT[:, 1:].astype(jnp.float32) * same_segment_BT
    nll_BT = -token_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:])
    return jnp.sum(nll_BT * w_BT), jnp.sum(w_BT)


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
