"""What the RL algorithms read of their models on [left-padded prompt | right-padded response] rows: the
response tokens' log-probs and entropies, the value head at each response position and the reward model's score
of each sequence. Shapes: B rows, P prompt tokens, N response tokens, D model width, V vocabulary."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.sampling import vocab_logits
from rlhf_jax.models.transformer import (
    Transformer, head_logits, lm_head_weight, positions_from_mask, shared_prompt_pass)
from rlhf_jax.rl.ppo_math import token_entropy
from rlhf_jax.training.losses import last_token_values, token_logprobs

# Rows x positions whose float32 logits exist at once in `response_token_stats` (a B x N x V tensor is gigabytes
# at a real vocabulary: 32 rows x 128 tokens x 151936 is 2.5 GB).
LOGIT_ROWS = 1024


class TokenStats(NamedTuple):
    """Per response token, under the logits / temperature the sampler drew from: log p of the token (0 at
    padding) and the entropy of the distribution."""

    logprobs_BN: jax.Array
    entropy_BN: jax.Array


def response_token_stats(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN,
                         temperature: float = 1.0, entropy_grad: bool = False, rngs=None, group: int = 1,
                         vocab: int | None = None) -> TokenStats:
    """`TokenStats` of the response tokens from one teacher-forced pass, the LM head applied to LOGIT_ROWS rows x
    positions at a time and recomputed in the backward pass, so that no float32 B x N x V logits exist.
    `entropy_grad`: the entropy is differentiated (an entropy bonus); otherwise it is a metric and its
    full-vocabulary backward is never built. `group` > 1: the rows come in runs of `group` consecutive rows with the
    same prompt (GRPO's samples of one prompt), and each prompt's pass runs once for its run (`shared_prompt_pass`).
    `vocab`: the sampler's (`SamplingParams.vocab`), so that the stats are of the distribution it drew from."""
    B, N = tokens_BN.shape
    if group > 1:  # the last response token's output predicts nothing
        x_BND = shared_prompt_pass(model, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN, group,
                                   rngs)[:, :-1]
    else:
        ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
        # final hidden states at P-1 .. T-2: position t predicts token t + 1, the first response token onwards
        x_BMD, _ = model.apply({"params": params}, ids_BT, positions_BT, mask_BT, head_last=N + 1, hidden=True,
                               rngs=rngs)
        x_BND = x_BMD[:, :-1]
    head_w = lm_head_weight(model, params)
    t = temperature if temperature > 0 else 1.0
    C = min(N, max(1, LOGIT_ROWS // B))
    pad = -N % C
    chunks = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
                                    .reshape(B, (N + pad) // C, C, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_stats(_, xs):
        x_BCD, tokens_BC = xs
        logits_BCV = vocab_logits(head_logits(model, x_BCD, head_w), vocab) / t
        entropy_BC = token_entropy(logits_BCV if entropy_grad else jax.lax.stop_gradient(logits_BCV))
        return None, (token_logprobs(logits_BCV, tokens_BC), entropy_BC)

    _, (logprobs_nBC, entropy_nBC) = jax.lax.scan(chunk_stats, None, (chunks(x_BND), chunks(tokens_BN)))
    unchunk = lambda y_nBC: jnp.moveaxis(y_nBC, 0, 1).reshape(B, N + pad)[:, :N]
    return TokenStats(jnp.where(mask_BN, unchunk(logprobs_nBC), 0.0), unchunk(entropy_nBC))


def _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN):
    ids_BT = jnp.concatenate([prompt_ids_BP, tokens_BN], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP.astype(bool), mask_BN.astype(bool)], axis=1)
    return ids_BT, mask_BT, positions_from_mask(mask_BT)


def response_values(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN,
                    gain: float = 1.0, bias: float = 0.0) -> jax.Array:
    """values_BN: gain * (the value head) + bias at the positions whose logits predict each response token, so
    values_BN[:, t] reads the prefix that ends just before token t."""
    ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    values_BT, _ = model.apply({"params": params}, ids_BT, positions_BT, mask_BT)
    P = prompt_ids_BP.shape[1]
    return gain * values_BT[:, P - 1:-1] + bias


def reward_scores(reward: Transformer, params, gain: float, bias: float, prompt_ids_BP, prompt_mask_BP, tokens_BN,
                  mask_BN, group: int = 1) -> jax.Array:
    """gain * (the scalar head at each [prompt | response]'s last real token) + bias. `group` > 1: rows in runs
    sharing a prompt, whose pass runs once for its run (`shared_prompt_pass`)."""
    if group > 1:  # the prompt's last token (always real), then the response's
        values_BM = shared_prompt_pass(reward, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN, group)
        mask_BM = jnp.concatenate([jnp.ones((mask_BN.shape[0], 1), bool), mask_BN.astype(bool)], axis=1)
        return gain * last_token_values(values_BM, mask_BM) + bias
    ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    values_BT, _ = reward.apply({"params": params}, ids_BT, positions_BT, mask_BT)
    return gain * last_token_values(values_BT, mask_BT) + bias

