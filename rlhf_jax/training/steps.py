"""Pure train and eval steps `(state, batch, rng) -> (state, metrics)`; jit, shardings and donation are applied
by the caller (`stages/train.py`). Gradient accumulation scans over micro-batches inside the step and divides by
the whole batch's token (or prompt) count, so it equals one large batch exactly.

`state.params` is what trains: every weight, or with LoRA the adapters and a scalar head, whose frozen base is
the step's `frozen` argument ({} in full fine-tuning); losses see both joined (`whole_params`)."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import OptimSection
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import Transformer, head_logits, lm_head_weight, shared_prompt_pass
from rlhf_jax.training.losses import last_token_values, next_token_nll, ranking_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def lr_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0 at `total_steps`."""
    warmup = min(optim.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    after = {"constant": optax.constant_schedule(optim.lr),
             "linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps)}[optim.schedule]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def decays(name: str) -> bool:
    """Weight decay applies to weight matrices and embeddings, never to norms or biases. Decided by name: a
    fused bias can have two dimensions (qkv_bias is (K, G+2, H)), so rank cannot tell."""
    return not (name == "scale" or name == "bias" or name.endswith("_bias"))


def decay_mask(params):
    """Bool per leaf; the name is the last dict key of its path (boxed params add attribute keys after it)."""
    name = lambda path: next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(name(path)), params)


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decay on weight matrices only, see `decays`) after global-norm clipping."""
    adamw = optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw) if optim.grad_clip else adamw


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def whole_params(trainable, frozen):
    """The model's params from what trains and the frozen rest (a LoRA model's base; {} when everything trains)."""
    return lora.join(trainable, frozen) if frozen else trainable


def micro_batches(batch, accum: int):
    """(B, ...) -> (accum, B / accum, ...), micro-batch a taking rows a, a + accum, ...: every device keeps an
    equal share of each micro-batch under a data-parallel sharding of B."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def accumulate(loss_sums: Callable, params, batch, accum: int, frozen=None, rng: jax.Array | None = None,
               reduce_aux: Callable | None = None):
    """Sum of the grads (of the trained `params` only) of `loss_sums(whole params, micro_batch, rngs) ->
    (scalar, aux)` over micro-batches, and the aux of every micro-batch reduced by `reduce_aux` (stacked on a
    leading axis; default: summed). The whole params join `params` with `frozen`; `rngs` is {"dropout": a key
    per micro-batch} from `rng` (LoRA dropout), else None."""
    def loss_of(trainable, micro, index):
        rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, index)}
        return loss_sums(whole_params(trainable, frozen), micro, rngs)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum == 1:
        (_, aux), grads = grad_fn(params, batch, 0)
        return grads, aux

    def body(grads, xs):
        micro, index = xs
        (_, aux), micro_grads = grad_fn(params, micro, index)
        return jax.tree.map(jnp.add, grads, micro_grads), aux

    micro = micro_batches(batch, accum)
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, aux_A = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return grads, (reduce_aux or _sum_leading)(aux_A)


def _sum_leading(tree):
    return jax.tree.map(lambda x: x.sum(0), tree)


def apply_grads(state: TrainState, grads, optimizer, schedule) -> tuple[TrainState, dict]:
    """One optimizer update with the summed `grads`; its grad_norm and learning rate."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    stats = {"grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), stats


# ------------------------------------------------------------------------------------------------------ SFT


def sft_loss_weights(batch: dict, loss_on_prompt: bool) -> jax.Array:
    return batch["mask"] if loss_on_prompt else batch["response_mask"]


def sft_sums(model: Transformer, params, batch: dict, weights_BT: jax.Array, rngs=None) -> dict:
    """Sum of token NLL and number of target tokens of one batch (the head applied a chunk of positions at a
    time: no float32 B x T x V logits)."""
    hidden_BTD, _ = model.apply({"params": params}, batch["ids"], batch["positions"], batch["mask"],
                                segment_ids_BT=batch["segment_ids"], rngs=rngs, hidden=True)
    head_w = lm_head_weight(model, params)
    nll, count = next_token_nll(hidden_BTD, lambda x_BCD: head_logits(model, x_BCD, head_w), batch["ids"],
                                        weights_BT, batch["segment_ids"])
    return {"nll_sum": nll, "target_tokens": count}


def sft_step(state: TrainState, batch: dict, rng: jax.Array, frozen, *, model: Transformer, optimizer, schedule,
             accum: int = 1, loss_on_prompt: bool = False) -> tuple[TrainState, dict]:
    same_BT = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    n_tokens = jnp.maximum(jnp.sum(sft_loss_weights(batch, loss_on_prompt)[:, 1:] * same_BT), 1.0)

    def loss_sums(params, micro, rngs):
        sums = sft_sums(model, params, micro, sft_loss_weights(micro, loss_on_prompt), rngs)
        return sums["nll_sum"] / n_tokens, sums

    grads, sums = accumulate(loss_sums, state.params, batch, accum, frozen, rng)
    state, stats = apply_grads(state, grads, optimizer, schedule)
    loss = sums["nll_sum"] / n_tokens
    return state, {**stats, "loss": loss, "perplexity": jnp.exp(loss), "target_tokens": sums["target_tokens"],
                   "tokens": jnp.sum(batch["mask"])}


def sft_eval_sums(params, batch: dict, *, model: Transformer, loss_on_prompt: bool = False) -> dict:
    """Sums over the real rows (`valid`) of an eval batch, to be added up across batches."""
    weights_BT = sft_loss_weights(batch, loss_on_prompt) & batch["valid"][:, None]
    return sft_sums(model, params, batch, weights_BT)


# ------------------------------------------------------------------------------------------------------- RM


def completion_rewards(model: Transformer, params, batch: dict, rngs=None) -> jax.Array:
    """rewards_BK: each [prompt | response] sequence's value at its last real token, from ONE pass over all B*K
    of them, each prompt's part run once for its K slots (`shared_prompt_pass`: the responses attend to its keys
    and values). Each unique response of a prompt has one slot, however many pairs it is in; empty (padding) slots
    are scored too (at the prompt's last token) but belong to no pair."""
    B, K, R = batch["response_ids"].shape
    P = batch["prompt_ids"].shape[1]
    tile = lambda x: jnp.broadcast_to(x[:, None], (B, K, P)).reshape(B * K, P)  # prompt b in rows b*K .. b*K+K-1
    response_mask_NR = batch["response_mask"].reshape(B * K, R).astype(bool)
    values_NM = shared_prompt_pass(model, params, tile(batch["prompt_ids"]), tile(batch["prompt_mask"]),
                                   batch["response_ids"].reshape(B * K, R), response_mask_NR, K, rngs)
    # the prompt's last token (always real) and then the response's: the last real one of the sequence
    mask_NM = jnp.concatenate([jnp.ones((B * K, 1), bool), response_mask_NR], axis=1)
    return last_token_values(values_NM, mask_NM).reshape(B, K)


def rm_sums(model: Transformer, params, batch: dict, weight_B=None, rngs=None) -> dict:
    return ranking_loss(completion_rewards(model, params, batch, rngs), batch["pairs"], weight_B)


def rm_step(state: TrainState, batch: dict, rng: jax.Array, frozen, *, model: Transformer, optimizer, schedule,
            accum: int = 1) -> tuple[TrainState, dict]:
    n_prompts = jnp.maximum(jnp.sum(batch["pairs"].sum((1, 2)) > 0), 1.0)

    def loss_sums(params, micro, rngs):
        sums = rm_sums(model, params, micro, rngs=rngs)
        return sums["loss_sum"] / n_prompts, sums

    grads, sums = accumulate(loss_sums, state.params, batch, accum, frozen, rng)
    state, stats = apply_grads(state, grads, optimizer, schedule)
    return state, {**stats, **rm_metrics(sums)}


def rm_metrics(sums: dict) -> dict:
    pairs = jnp.maximum(sums["pairs"], 1.0)
    return {"loss": sums["loss_sum"] / jnp.maximum(sums["prompts"], 1.0), "accuracy": sums["correct"] / pairs,
            "margin": sums["margin_sum"] / pairs, "pairs": sums["pairs"], "prompts": sums["prompts"]}


def rm_eval_sums(params, batch: dict, *, model: Transformer) -> dict:
    return rm_sums(model, params, batch, batch["valid"].astype(jnp.float32))
