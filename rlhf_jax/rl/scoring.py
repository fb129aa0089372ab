"""What the RL algorithms read of their models on [left-padded prompt | right-padded response] rows: the
response tokens' log-probs, the value head at each response position and the reward model's score of each
sequence. Shapes: B rows, P prompt tokens, N response tokens, V vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import Transformer, positions_from_mask
from rlhf_jax.training.losses import last_token_values, token_logprobs


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
                  mask_BN) -> jax.Array:
    """gain * (the scalar head at each [prompt | response]'s last real token) + bias."""
    ids_BT, mask_BT, positions_BT = _sequence(prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN)
    values_BT, _ = reward.apply({"params": params}, ids_BT, positions_BT, mask_BT)
    return gain * last_token_values(values_BT, mask_BT) + bias


def masked_logprobs(logits_BNV, tokens_BN, mask_BN, *_):
    """log p of each response token under the logits, 0 at padding."""
    return jnp.where(mask_BN, token_logprobs(logits_BNV, tokens_BN), 0.0)
