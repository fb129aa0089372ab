"""Direct Preference Optimisation (Rafailov et al. 2023) on K-way rankings, and its IPO variant (Azar et al.
2023): the policy is trained on the comparisons directly, its implicit reward being beta * log(pi / ref).

Every comparison of a prompt counts, as in the reward model's ranking loss (`training.losses.ranking_loss`):
pairs_BKK[b, i, j] counts how often response i was preferred to response j; per prompt the count-weighted mean
over its pairs, then the mean over the prompts that have a pair. Each response slot is scored once, by ONE
forward pass over all B*K [prompt | response] sequences, whatever the number of pairs it is in.

Shapes: B prompts of P left-padded tokens, K response slots of R right-padded tokens (empty slots: no tokens,
log-prob 0, in no pair).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import Transformer, without_adapters
from rlhf_jax.rl.scoring import response_token_stats
from rlhf_jax.training.steps import TrainState, accumulate, apply_grads


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The loss's numbers (the dpo stage fills them from the config's `dpo` section)."""

    beta: float = 0.1
    loss: str = "sigmoid"  # or "ipo"
    label_smoothing: float = 0.0  # sigmoid: the assumed probability that a preference is flipped


def response_logprobs(model: Transformer, params, batch: dict, rngs=None) -> jax.Array:
    """logps_BK: the summed log-prob (temperature 1) of each response slot given its prompt, from one
    teacher-forced pass over the B*K [prompt | response] sequences, each prompt's part run once for its K slots
    (`response_token_stats` with group K: the responses attend to its keys and values) and the LM head a few
    positions at a time (no float32 B*K x R x V logits)."""
    B, K, R = batch["response_ids"].shape
    P = batch["prompt_ids"].shape[1]
    tile = lambda x: jnp.broadcast_to(x[:, None], (B, K, P)).reshape(B * K, P)  # prompt b in rows b*K .. b*K+K-1
    stats = response_token_stats(model, params, tile(batch["prompt_ids"]), tile(batch["prompt_mask"]),
                                 batch["response_ids"].reshape(B * K, R), batch["response_mask"].reshape(B * K, R),
                                 rngs=rngs, group=K)
    return jnp.sum(stats.logprobs_BN, axis=1).reshape(B, K)


def dpo_loss(policy_logps_BK: jax.Array, ref_logps_BK: jax.Array, pairs_BKK: jax.Array, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0, weight_B: jax.Array | None = None) -> dict:
    """Sums over the prompts with a pair (times `weight_B`, eval's real rows) for exact accumulation: the loss
    (per prompt the count-weighted mean of each pair's loss), prompts, pairs, and over pairs the implicit
    rewards beta * (logpi - logref) of the preferred (chosen) and dispreferred (rejected) response, their
    difference and how often it is positive. A pair (i preferred to j) has h = log-ratio_i - log-ratio_j and loss
      sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo      (h - 1 / (2 beta))^2."""
    pairs_BKK = pairs_BKK.astype(jnp.float32)
    log_ratio_BK = policy_logps_BK - ref_logps_BK
    h_BKK = log_ratio_BK[:, :, None] - log_ratio_BK[:, None, :]
    if loss == "sigmoid":
        eps = label_smoothing
        pair_loss_BKK = (1.0 - eps) * jax.nn.softplus(-beta * h_BKK) + eps * jax.nn.softplus(beta * h_BKK)
    elif loss == "ipo":
        pair_loss_BKK = jnp.square(h_BKK - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    n_pairs_B = pairs_BKK.sum((1, 2))
    has_pairs_B = (n_pairs_B > 0).astype(jnp.float32)
    if weight_B is not None:
        has_pairs_B = has_pairs_B * weight_B
    per_prompt_B = jnp.sum(pairs_BKK * pair_loss_BKK, (1, 2)) / jnp.maximum(n_pairs_B, 1.0)
    pair_w_BKK = pairs_BKK * has_pairs_B[:, None, None]
    reward_BK = beta * log_ratio_BK
    chosen_BKK, rejected_BKK = reward_BK[:, :, None], reward_BK[:, None, :]
    return {
        "loss_sum": jnp.sum(per_prompt_B * has_pairs_B),
        "prompts": jnp.sum(has_pairs_B),
        "pairs": jnp.sum(pair_w_BKK),
        "correct": jnp.sum(pair_w_BKK * (chosen_BKK > rejected_BKK)),
        "chosen_sum": jnp.sum(pair_w_BKK * chosen_BKK),
        "rejected_sum": jnp.sum(pair_w_BKK * rejected_BKK),
        "margin_sum": jnp.sum(pair_w_BKK * (chosen_BKK - rejected_BKK)),
    }


def dpo_metrics(sums: dict) -> dict:
    """The logged metrics of summed `dpo_loss` outputs: per-prompt mean loss, and pair means of the rewards."""
    pairs = jnp.maximum(sums["pairs"], 1.0)
    return {"loss": sums["loss_sum"] / jnp.maximum(sums["prompts"], 1.0),
            "reward_chosen": sums["chosen_sum"] / pairs, "reward_rejected": sums["rejected_sum"] / pairs,
            "reward_margin": sums["margin_sum"] / pairs, "reward_accuracy": sums["correct"] / pairs,
            "pairs": sums["pairs"], "prompts": sums["prompts"]}


def reference_logprobs(model: Transformer, reference, batch: dict) -> jax.Array:
    """ref_logps_BK: the frozen reference's, scored now by `model` without adapters (a LoRA policy's reference is
    its base), or (`reference` None) those precomputed into the batch."""
    if reference is None:
        return batch["ref_logps"]
    return jax.lax.stop_gradient(response_logprobs(without_adapters(model), reference, batch))


def dpo_sums(model: Transformer, params, batch: dict, reference, settings: DPOSettings, weight_B=None,
             rngs=None) -> dict:
    return dpo_loss(response_logprobs(model, params, batch, rngs), reference_logprobs(model, reference, batch),
                    batch["pairs"], settings.beta, settings.loss, settings.label_smoothing, weight_B)


def dpo_step(state: TrainState, batch: dict, rng: jax.Array, frozen, reference, *, model: Transformer, optimizer,
             schedule, accum: int = 1, settings: DPOSettings = DPOSettings()) -> tuple[TrainState, dict]:
    """One optimizer step on a rankings batch; `frozen`: a LoRA policy's base ({} in full fine-tuning);
    `reference`: the reference params, or None when the batch carries the precomputed `ref_logps` (B, K).
    Micro-batches divide by the whole batch's prompt count, so accumulating equals one large batch."""
    n_prompts = jnp.maximum(jnp.sum(batch["pairs"].sum((1, 2)) > 0), 1.0)

    def loss_sums(params, micro, rngs):
        sums = dpo_sums(model, params, micro, reference, settings, rngs=rngs)
        return sums["loss_sum"] / n_prompts, sums

    grads, sums = accumulate(loss_sums, state.params, batch, accum, frozen, rng)
    state, stats = apply_grads(state, grads, optimizer, schedule)
    return state, {**stats, **dpo_metrics(sums)}


def dpo_eval_sums(params, batch: dict, reference, *, model: Transformer,
                  settings: DPOSettings = DPOSettings()) -> dict:
    """Sums over the real rows (`valid`) of an eval batch (`params`: the policy's whole params), to be added up
    across batches."""
    return dpo_sums(model, params, batch, reference, settings, batch["valid"].astype(jnp.float32))
