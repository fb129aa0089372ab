"""Pure array functions for the training objectives; each is tested against a brute-force loop."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position, from float32 logits."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, jnp.maximum(targets_BT, 0))


def next_token_nll(hidden_BTD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], ids_BT: jax.Array,
                   weight_BT: jax.Array, segment_ids_BT: jax.Array, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted NLL, sum of weights) for predicting ids[t+1] from position t's final hidden state. A
    target counts when its weight is set and it belongs to the same packed example as its context.
    No float32 B x T x V tensor: `logits_fn` (the LM head, x_BCD -> logits_BCV) and the cross-entropy run on
    `chunk` positions of every row at a time. Differentiated, each chunk's gradient (of its hidden states and of
    the head's weights) is taken as soon as its loss is, in the same pass: the loss is a sum, so the backward
    pass only scales them, and no chunk's logits are formed twice (a quarter of a small model's FLOPs at a real
    vocabulary). Chunks span all rows, so a batch-sharded step keeps every device busy. A chunk with no target
    (the left-padded prompts of an SFT batch that trains on responses only) skips the head."""
    B, T, D = hidden_BTD.shape
    same_segment_BT = segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
    # position t predicts ids[t + 1]; the last position predicts nothing (weight 0), nor do the chunks' padding
    w_BT = jnp.pad(weight_BT[:, 1:].astype(jnp.float32) * same_segment_BT, ((0, 0), (0, 1)))
    targets_BT = jnp.pad(ids_BT[:, 1:], ((0, 0), (0, 1)))
    C = min(chunk, T)
    pad = -T % C
    chunks = lambda x_BT: jnp.moveaxis(jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
                                       .reshape(B, (T + pad) // C, C, *x_BT.shape[2:]), 1, 0)
    x_nBCD = chunks(hidden_BTD)
    # the head's weights (closed over by logits_fn) become arguments, so that the custom gradient can return theirs
    head, weights = jax.closure_convert(logits_fn, x_nBCD[0])
    total = _summed_nll(head, x_nBCD, chunks(targets_BT), chunks(w_BT), *weights)
    return total, jnp.sum(w_BT)


def _chunks_nll(head, x_nBCD, targets_nBC, w_nBC, weights, grads_of=None):
    """The summed NLL of every chunk, and with `grads_of` (one bool per head weight; None: no gradients) its
    gradients: d/dx per chunk (x_nBCD's shape) and d/d(head weight) for the weights marked, summed over chunks in
    float32 (None for the others: a frozen head's gradient is never formed)."""
    wanted = [i for i, g in enumerate(grads_of or ()) if g]

    def chunk_nll(x_BCD, targets_BC, w_BC, *weights):
        return -jnp.sum(token_logprobs(head(x_BCD, *weights), targets_BC) * w_BC)

    def step(carry, xs):
        total, grads = carry
        x_BCD, targets_BC, w_BC = xs
        if grads_of is None:
            nll = jax.lax.cond(jnp.any(w_BC > 0), lambda: chunk_nll(x_BCD, targets_BC, w_BC, *weights),
                               lambda: jnp.zeros((), jnp.float32))
            return (total + nll, grads), None

        def run(grads):
            def nll_of(x, *wanted_weights):
                all_weights = list(weights)
                for i, w in zip(wanted, wanted_weights):
                    all_weights[i] = w
                return chunk_nll(x, targets_BC, w_BC, *all_weights)

            nll, vjp = jax.vjp(nll_of, x_BCD, *[weights[i] for i in wanted])
            dx_BCD, *dweights = vjp(jnp.ones((), nll.dtype))
            return nll, dx_BCD, [g + d.astype(jnp.float32) for g, d in zip(grads, dweights)]

        skip = lambda grads: (jnp.zeros((), jnp.float32), jnp.zeros_like(x_BCD), grads)
        nll, dx_BCD, grads = jax.lax.cond(jnp.any(w_BC > 0), run, skip, grads)
        return (total + nll, grads), dx_BCD

    grads = [jnp.zeros(weights[i].shape, jnp.float32) for i in wanted]
    (total, grads), dx_nBCD = jax.lax.scan(step, (jnp.zeros((), jnp.float32), grads), (x_nBCD, targets_nBC, w_nBC))
    all_grads = [None] * len(weights)
    for i, g in zip(wanted, grads):
        all_grads[i] = g.astype(weights[i].dtype)
    return total, (dx_nBCD, all_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed_nll(head, x_nBCD, targets_nBC, w_nBC, *weights):
    return _chunks_nll(head, x_nBCD, targets_nBC, w_nBC, weights)[0]


def _summed_nll_fwd(head, x_nBCD, targets_nBC, w_nBC, *weights):
    # symbolic_zeros: each argument comes with whether it is differentiated (a LoRA run's frozen head is not)
    value = lambda a: a.value
    total, residuals = _chunks_nll(head, value(x_nBCD), value(targets_nBC), value(w_nBC),
                                   [value(w) for w in weights], grads_of=[w.perturbed for w in weights])
    return total, residuals


def _summed_nll_bwd(head, residuals, g):
    dx_nBCD, grads = residuals
    scale = lambda d: None if d is None else (g * d).astype(d.dtype)
    return (scale(dx_nBCD), None, None, *map(scale, grads))


_summed_nll.defvjp(_summed_nll_fwd, _summed_nll_bwd, symbolic_zeros=True)


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
