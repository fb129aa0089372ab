"""The state a training stage trains: the model loaded for training (with its head and, with `lora.rank`, its
adapters), the sharded TrainState of what trains and the frozen rest, its jitted, donated step, batch sizes and
step counts checked against the mesh, micro-batched evaluation and the params-only export (and the PEFT adapter).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.errors import DivergedError, UserError
from rlhf_jax.models import lora
from rlhf_jax.models.checkpoint import (CHAT_TEMPLATE, LoadedModel, check_role, load_model, save_model,
                                       warn_prompt_form)
from rlhf_jax.models.hf import fold_reward_gain
from rlhf_jax.models.hf_weights import whole_weights_to_hf
from rlhf_jax.models.tiny import resolve_model_path
from rlhf_jax.models.tokenizer import check_chat_template, load_tokenizer
from rlhf_jax.models.layer_stack import unstack_layers
from rlhf_jax.models.transformer import (
    Transformer, init_boxed, init_scalar_head, make_model, param_logical_axes, params_for,
)
from rlhf_jax.runtime import distributed, fsio, sharding
from rlhf_jax.training import steps

REWARD_NORM_FILE = "reward_norm.json"  # a scalar model's adapter: the normalisation HF's score layer cannot hold


# --------------------------------------------------------------------------------------------- the model


def lora_spec(cfg: Config) -> lora.LoraSpec | None:
    """The adapters the trained models hold (the config's `lora` section), or None for full fine-tuning."""
    if not cfg.lora.rank:
        return None
    return lora.LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, cfg.lora.also_train)


def check_lora(cfg: Config) -> None:
    """The stages that train on their own samples (ppo, grpo, rloo) take no LoRA dropout: it would make the
    policy's log-probs random, so the rollout's and the update's would differ before any step (ratio != 1)."""
    if cfg.lora.rank and cfg.lora.dropout:
        raise UserError(f"lora.dropout={cfg.lora.dropout}: stage {cfg.stage!r} trains on its own samples and needs "
                        "lora.dropout 0 (dropout would make the policy's log-probs random)")


def load_for_training(cfg: Config, run_dir: Path, head: str):
    """(loaded checkpoint, tokenizer, model with `head`, and adapters with `lora.rank`) of cfg.model.path (the
    tiny built-in model when empty)."""
    loaded = load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed), need_tokenizer=True,
                        key="model.path" if cfg.model.path else "")
    if head == "lm" and loaded.head != "lm":
        where = f"model.path={cfg.model.path}"
        check_role(loaded, where, "policy")  # what it is, when its export recorded that
        raise UserError(f"{where}: a reward/value model (scalar head), expected a policy")
    where = model_key(cfg)
    warn_prompt_form(loaded, cfg.data.chat_template, where)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, loaded.cfg.family)
    check_chat_template(tokenizer, cfg.data.chat_template, where)  # before the model is placed or compiled
    warn_bfloat16_training(cfg, head)
    return loaded, tokenizer, trained_model(cfg, loaded.cfg, head)


def model_key(cfg: Config) -> str:
    """How messages name the model a stage starts from."""
    return f"model.path={cfg.model.path}" if cfg.model.path else "the built-in tiny model"


def warn_bfloat16_training(cfg: Config, head: str) -> None:
    """Weights trained whole in bfloat16 barely move: AdamW changes a weight by about the learning rate per step,
    and bfloat16 (8 significant bits) rounds away any change below 1/256 of the weight. LoRA's adapters are
    float32; what trains whole beside them (lora.also_train, a scalar head) is in param_dtype."""
    if cfg.model.param_dtype != "bfloat16" or (cfg.lora.rank and not cfg.lora.also_train and head == "lm"):
        return
    print(f"warning: model.param_dtype=bfloat16: AdamW moves a weight by about optim.lr ({cfg.optim.lr:g}) per step, "
          f"which bfloat16 rounds away for every weight above {256 * cfg.optim.lr:.2g}: most weights would not "
          "train; keep param_dtype float32 (the compute stays in model.dtype) or train LoRA adapters (float32)",
          file=sys.stderr)


def trained_model(cfg: Config, model_cfg, head: str) -> Transformer:
    """The model a stage trains, as the config asks (dtypes, remat, LoRA). A scalar-head model has no LM head:
    lora.also_train's lm_head (refused for stage rm by the config) is left to the policy beside a value model."""
    spec = lora_spec(cfg)
    if spec is not None and "lm_head" in spec.also_train:
        if head == "scalar":
            spec = dataclasses.replace(spec, also_train=tuple(m for m in spec.also_train if m != "lm_head"))
        elif model_cfg.tie_embeddings:
            raise UserError("lora.also_train: the model ties its LM head to its embeddings; name embed instead of "
                            "lm_head")
    try:
        return stage_model(cfg, model_cfg, head, spec)
    except UserError as e:
        raise UserError(f"lora.rank={cfg.lora.rank}: {e}") from None


def stage_model(cfg: Config, model_cfg, head: str, spec: lora.LoraSpec | None = None) -> Transformer:
    """A model as the config's model section runs it (dtypes, remat, scanned layers), with LoRA adapters when
    `spec` is given."""
    m = cfg.model
    return make_model(model_cfg, head, m.dtype, m.param_dtype, remat=m.remat == "block", lora=spec,
                      scan_layers=m.scan_layers)


def with_head(params: dict, cfg, from_head: str, to_head: str, rng: jax.Array) -> dict:
    """A checkpoint's params for a model with `to_head`: a language model becoming a reward or value model
    drops its LM head and gets a fresh scalar head, and nothing else is initialised."""
    if to_head == from_head:
        return dict(params)
    if to_head == "scalar" and from_head == "lm":
        out = {k: v for k, v in params.items() if k != "lm_head"}
        out["score"] = init_scalar_head(cfg, rng)
        return out
    raise UserError(f"cannot train a {to_head!r}-head model from a {from_head!r}-head checkpoint")


def check_positions(model_cfg, length: int, keys: str, whose: str = "") -> None:
    """Sequences must fit the model's positions: GPT-2 would read past its position table (NaN), and rotary
    models were never trained there. `whose` names the model (model.path=PATH) where the message would not."""
    if length > model_cfg.max_position_embeddings:
        raise UserError(f"{keys} = {length} exceeds the model's {model_cfg.max_position_embeddings} positions"
                        + (f" ({whose})" if whose else ""))


def report_sharding(model: Transformer, mesh) -> None:
    """Print how the params are split over the mesh (one screen) and warn once per replicated fallback."""
    abstract = jax.eval_shape(lambda: nn.unbox(init_boxed(model, jax.random.key(0))))
    sharding.print_sharding_report(sharding.sharding_report(param_logical_axes(model), abstract, mesh))


def initial_params(loaded: LoadedModel, model: Transformer, seed: int) -> dict:
    """Host params in the model's layout and parameter dtype; a LoRA model's fresh adapters (float32) added."""
    params = with_head(loaded.params, loaded.cfg, loaded.head, model.head, jax.random.key(seed))
    params = jax.tree.map(lambda x: np.asarray(x).astype(model.param_dtype), params)
    if model.lora is not None:
        adapters = lora.init_adapters(loaded.cfg, model.lora, jax.random.fold_in(jax.random.key(seed), 1))
        params = lora.with_adapters(params, jax.tree.map(np.asarray, adapters))
    return params_for(model, params)


def split_trainable(model: Transformer, params) -> tuple[dict, dict]:
    """(what trains, the frozen rest) of a model's params: every weight and {}, or a LoRA model's adapters, scalar
    head and lora.also_train weights, and the rest of its base."""
    return lora.split(params, model.lora) if model.lora is not None else (params, {})


def state_shardings(model: Transformer, optimizer, mesh):
    """NamedShardings of the whole TrainState (of what trains) from the params' logical names: optimizer moments
    inherit them."""
    trainable, _ = split_trainable(model, jax.eval_shape(lambda: init_boxed(model, jax.random.key(0))))
    return _named(jax.eval_shape(lambda p: steps.init_state(p, optimizer), trainable), mesh)


def frozen_shardings(model: Transformer, mesh):
    """NamedShardings of the frozen params (a LoRA model's base; {} in full fine-tuning)."""
    return split_trainable(model, param_shardings(model, mesh))[1]


def param_shardings(model: Transformer, mesh):
    """NamedShardings of the model's whole params."""
    return _named(jax.eval_shape(lambda: init_boxed(model, jax.random.key(0))), mesh)


def _named(abstract_boxed, mesh):
    specs, shapes = nn.get_partition_spec(abstract_boxed), nn.unbox(abstract_boxed)
    return jax.tree.map(lambda spec, x: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        tuple(spec), x.shape, mesh)), specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def place_state(params: dict, optimizer, state_sh):
    """The initial TrainState, built on the mesh (optimizer moments are created sharded, never on one device)."""
    init = jax.jit(lambda p: steps.init_state(p, optimizer), in_shardings=(state_sh.params,), out_shardings=state_sh)
    return init(params)


def jit_step(step: Callable, state_sh, mesh, *frozen_sh):
    """`step(state, batch, rng, *frozen) -> (state, metrics)` jitted over the mesh: batches split over the
    data-parallel axes, metrics replicated, and the old state's buffers donated to the new one. `frozen_sh`: the
    shardings of each frozen argument (a LoRA model's base, dpo's reference), never donated."""
    repl = sharding.replicated(mesh)
    in_shardings = (state_sh, sharding.batch_sharding(mesh), repl, *frozen_sh)
    return sharding.jit(step, mesh, in_shardings=in_shardings, out_shardings=(state_sh, repl), donate_argnums=0)


def to_global(batch: dict, mesh) -> dict:
    """This host's rows -> one global array per key, split over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- sizes


def micro_batch_size(cfg: Config, mesh) -> int:
    """Rows forwarded at once: train.batch_size / optim.grad_accum_steps, checked against the mesh."""
    batch, accum = cfg.train.batch_size, cfg.optim.grad_accum_steps
    check_micro_batches(cfg)
    sharding.check_batch_size(batch // accum, mesh, "train.batch_size" if accum == 1 else
                              f"train.batch_size / optim.grad_accum_steps ({batch} / {accum})")
    return batch // accum


def eval_batch_size(cfg: Config, mesh) -> int:
    """Rows per evaluation forward: train.eval_batch_size, or the training micro-batch, which is known to fit."""
    size = cfg.train.eval_batch_size or micro_batch_size(cfg, mesh)
    sharding.check_batch_size(size, mesh, "train.eval_batch_size")
    return size


def check_duration(cfg: Config) -> None:
    """How long to train, checked without data (by --check, and by a pipeline before its first step)."""
    if not cfg.train.steps and not cfg.train.epochs:
        raise UserError("set train.steps or train.epochs (passes over the training split)")
    if not cfg.train.steps and cfg.data.pack and cfg.stage in ("sft", "rm", "dpo"):
        raise UserError("train.epochs cannot be used with data.pack (the packed row count is not known in "
                        "advance); set train.steps")


def check_micro_batches(cfg: Config) -> None:
    batch, accum = cfg.train.batch_size, cfg.optim.grad_accum_steps
    if batch % accum:
        raise UserError(f"train.batch_size={batch} is not divisible by optim.grad_accum_steps={accum}")


def total_steps(cfg: Config, train_examples: int) -> int:
    """train.steps, or the steps of train.epochs passes over the training split (never past the last epoch)."""
    check_duration(cfg)
    t = cfg.train
    return t.steps or max(1, math.floor(t.epochs * train_examples / t.batch_size))


# --------------------------------------------------------------------------------------------- evaluation and export


def eval_sums(eval_fn, params, batches: Iterator[dict], mesh, limit: int = 0) -> dict:
    """Sums of `eval_fn(params, batch)` over the batches (the first `limit` when > 0), as floats."""
    totals: dict = {}
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        sums = jax.device_get(eval_fn(params, to_global(batch, mesh)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return totals


def export(out_dir: Path, params, loaded: LoadedModel, model: Transformer, extra: dict | None = None,
           role: str | None = None, *, chat_template: bool) -> Path:
    """Params-only model checkpoint (Orbax, with tokenizer) for the next stage and for convert --to-hf: float32,
    written shard by shard from the mesh (with several processes, each writes its own shards); a LoRA model's
    adapters merged into its weights. Its `role` is recorded: by default a language model is a policy and a
    scalar head a reward model (ppo's value model says so); and whether it trained on prompts in the chat
    template (`chat_template`, data.chat_template), for `warn_prompt_form` where it is used."""
    if not bool(all_finite(params)):
        raise DivergedError(f"the parameters hold non-finite values; {out_dir} was not written")
    params = canonical_float32(params) if model.lora is None else merged_float32(params, model)
    role = role or ("policy" if model.head == "lm" else "reward")
    return save_model(out_dir, params, loaded.cfg, model.head, loaded.tokenizer_dir, overwrite=True,
                      extra={**(extra or {}), "role": role, CHAT_TEMPLATE: chat_template})


def export_adapter(out_dir: Path, params, loaded: LoadedModel, model: Transformer, base_model: str,
                   extra: dict | None = None) -> Path:
    """A LoRA model's adapters (from its whole `params`) in PEFT's layout (adapter_config.json +
    adapter_model.safetensors), with the weights lora.also_train trains as its modules_to_save, for
    `peft.PeftModel.from_pretrained` on the HF base model at `base_model`; written by the primary process.
    A reward or value model's adapter is a sequence-classification one: its `score` head is saved whole with the
    reward normalisation of `extra` folded in as `convert --to-hf` does (the gain into the weights; the bias,
    which HF's score layer lacks, in reward_norm.json)."""
    adapters = distributed.to_host(lora.adapters(params))
    whole = unstack_layers(lora.also_trained(params, model.lora))
    if model.head == "scalar":
        whole = {**whole, "score": params["score"]}
    whole, extra = fold_reward_gain(distributed.to_host(as_float32(whole)), extra)
    saved = whole_weights_to_hf(whole, loaded.cfg)
    with fsio.replace_dir(out_dir, overwrite=True) as tmp:
        if distributed.is_primary():
            lora.write_adapter(tmp, adapters, loaded.cfg, model.lora, base_model, saved)
            if extra.get("reward_norm"):
                (tmp / REWARD_NORM_FILE).write_text(json.dumps(extra["reward_norm"], indent=2))
    return Path(out_dir).resolve()


@functools.partial(jax.jit, static_argnums=1)
def merged_float32(params, model: Transformer):
    return lora.merged(as_float32(params), model.cfg, model.lora)


@jax.jit
def canonical_float32(params):
    """float32 params in the per-layer layout that checkpoints hold (a scanned stack's layers split apart)."""
    return unstack_layers(as_float32(params))


def as_float32(params):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


@jax.jit
def all_finite(tree) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in floats] or [True]))
