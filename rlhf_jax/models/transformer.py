"""One decoder-only transformer family: GPT-2, Llama 2/3, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 text
(`ModelConfig` in architecture.py says which; the layers are in layers.py).

Parameters are plain pytrees with logical axis names (Linen `with_logical_partitioning`); the KV cache is an
explicit pytree passed in and returned. Projections are fused (q/k/v grouped per KV head, gate/up stacked) so
that a decode step issues few, large matmuls and tensor parallelism splits along whole KV groups.

Shape suffixes: B batch, T query length, S key length (cache slots), D model width, K KV heads,
G query heads per KV head, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.layer_stack import STACKED, in_layout, layer_name
from rlhf_jax.models.layers import MLP, Attention, AttentionImpl, Norm, dense, dense_init, param, softcap
from rlhf_jax.models.lora import LoraSpec, check_family
from rlhf_jax.runtime import sharding

SCAN_LAYERS_ABOVE = 8  # deeper models scan their layers by default: compile time then stays flat in depth
PAD_ID = -1  # never a real token: masks carry the truth and the model embeds out-of-range ids as 0


class KVCache(NamedTuple):
    """Keys and values of every layer: a tuple of k_BKHS and of v_BKSH per layer for a model that loops over its
    layers, one k_LBKHS and one v_LBKSH stacked over layers for one that scans them (`stacked`). Heads before slots
    is the layout attention's matmuls read: slots before heads cost a transposed copy of the whole cache in every
    layer of every decode step; keys hold their head dim before their slots (layers.py says why)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32, stacked: bool = False) -> "KVCache":
        k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, slots)
        v_shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
        if stacked:
            return cls(*(jnp.zeros((cfg.n_layers, *shape), dtype) for shape in (k_shape, v_shape)))
        return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for shape in (k_shape, v_shape)))


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row; left padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


_score_init = dense_init()  # the scalar head, in the Transformer and in `init_scalar_head` alike


def init_scalar_head(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> jax.Array:
    """A fresh `score` weight (d_model, 1), drawn as the Transformer draws it: turns an LM into a reward or
    value model without initialising a whole random model."""
    return _score_init(rng, (cfg.d_model, 1), dtype)


class Block(nn.Module):
    """Pre-norm residual block; Gemma also normalises each branch's output (post_attn_norm, post_mlp_norm).
    Called as one step of a scan over layers: carry (x_BTD, cache) -> (carry, kv), where `cache` is the
    KVCache of every layer (read and written at index `layer`) or None for a full pass. `sliding`: whether the layer
    attends within the config's sliding window, a Python bool or (a scanned stack whose layers differ) traced.
    A full pass may attend after a `prefix` (this layer's keys and values of earlier tokens), and return its own
    (`keep_kv`) as kv (otherwise None)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"
    lora: LoraSpec | None = None
    keep_kv: bool = False  # a full pass returns this layer's keys and values as the step's output

    @nn.compact
    def __call__(self, carry, layer, sliding, positions_BT, key_mask_BS, cache_index, segment_ids_BT, prefix=None):
        x_BTD, cache = carry
        x_BTD = sharding.constrain_batch(x_BTD)  # weights are gathered to the rows, never rows to the weights
        kw = dict(cfg=self.cfg, param_dtype=self.param_dtype)
        static = isinstance(sliding, bool)
        h, written = Attention(**kw, dtype=self.dtype, attention=self.attention, sliding=static and sliding,
                               lora=self.lora, name="attn")(
            Norm(**kw, name="attn_norm")(x_BTD), positions_BT, key_mask_BS, cache, cache_index, segment_ids_BT,
            cache_layer=layer, sliding_flag=None if static else sliding, prefix_kv=prefix, keep_kv=self.keep_kv)
        cache, kv = (None, written) if cache is None else (KVCache(*written), None)
        if self.cfg.is_gemma:
            h = Norm(**kw, name="post_attn_norm")(h)
        x_BTD = x_BTD + h
        h = MLP(**kw, dtype=self.dtype, lora=self.lora, name="mlp")(Norm(**kw, name="mlp_norm")(x_BTD))
        if self.cfg.is_gemma:
            h = Norm(**kw, name="post_mlp_norm")(h)
        return (x_BTD + h, cache), kv


class Transformer(nn.Module):
    """Decoder LM. `head='lm'` returns float32 logits_BTV; `head='scalar'` returns float32 values_BT.
    `attention`: 'auto' uses cuDNN fused attention for bf16 full passes on NVIDIA GPUs and the einsum
    elsewhere; 'einsum' always the einsum; 'cudnn' cuDNN for every full pass (bf16/fp16 on a GPU only).
    `lora`: the model holds LoRA adapters on the projections it targets (`rlhf_jax.models.lora`); the same
    model without it, on the base params, is the model before any adapter."""

    cfg: ModelConfig
    head: Literal["lm", "scalar"] = "lm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: AttentionImpl = "auto"
    lora: LoraSpec | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, key_mask_BS, cache: KVCache | None = None, cache_index=0,
                 head_last: int = 0, segment_ids_BT=None, hidden: bool = False, prefix: KVCache | None = None,
                 keep_kv: bool = False):
        """Full pass when `cache` is None (key_mask_BS is then the T-token mask), else a cached step that writes
        slots [cache_index, cache_index + T) and attends over every valid slot. `segment_ids_BT` (full pass
        only) keeps packed examples apart. A full pass may continue a `prefix`: the KVCache of P earlier tokens
        (as `keep_kv` returns them), attended to and never written, key_mask_BS then covering P + T slots; it
        is differentiable, so that one prompt's pass can serve several continuations in training.
        `keep_kv`: a full pass returns its own keys and values as a KVCache in place of the cache.
        `head_last` > 0 applies the final norm and head to the last `head_last` positions only (the sampler's
        prefill needs 1; log-probs of a response, its length + 1).
        `hidden`: an LM returns the final norm's output x_BTD instead of logits, for a loss that applies the
        head itself a few positions at a time (`lm_head_weight`, `head_logits`). Returns (out, new_cache)."""
        cfg = self.cfg
        kw = dict(cfg=cfg, param_dtype=self.param_dtype)
        embedding = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dense_init(),
                          self.param_dtype)
        # jnp.take wraps negative ids (a pad of -1 reads the last vocab row, a real token) and gives NaN rows
        # for ids outside [-V, V): embed every out-of-range id as id 0 instead.
        tokens_BT = jnp.where((tokens_BT >= 0) & (tokens_BT < cfg.vocab_size), tokens_BT, 0)
        x_BTD = jnp.take(embedding, tokens_BT, axis=0).astype(self.dtype)
        if cfg.is_gemma:  # HF rounds the normalizer to the compute dtype (sqrt(3072) is 55.5 in bf16)
            x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), self.dtype)
        if cfg.is_gpt2:
            wpe = param(self, "pos_embed", (cfg.max_position_embeddings, cfg.d_model), (None, "embed"),
                        dense_init(0.01), self.param_dtype)
            x_BTD = x_BTD + jnp.take(wpe, positions_BT, axis=0).astype(self.dtype)

        x_BTD, new_cache = self._layers(x_BTD, cache, positions_BT, key_mask_BS, cache_index, segment_ids_BT, prefix,
                                        keep_kv)
        x_BTD = sharding.constrain_batch(x_BTD)

        if head_last:
            x_BTD = x_BTD[:, -head_last:]
        x_BTD = Norm(**kw, name="final_norm")(x_BTD)
        if self.head == "scalar":
            w = param(self, "score", (cfg.d_model, 1), ("embed", None), _score_init, self.param_dtype)
            return dense(self.dtype, x_BTD, w.astype(self.dtype), jnp.float32)[..., 0], new_cache
        if cfg.tie_embeddings:
            head_w = embedding.astype(self.dtype)
        else:
            head_w = param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dense_init(),
                           self.param_dtype).astype(self.dtype)
        return (x_BTD if hidden else head_logits(self, x_BTD, head_w)), new_cache

    def _layers(self, x_BTD, cache, positions_BT, key_mask_BS, cache_index, segment_ids_BT, prefix, keep_kv):
        """Every block in turn: a Python loop (params `layer_<i>`) or, with scan_layers, one `nn.scan` over params
        stacked under `layers` (compiled once, whatever the depth). Returns (x_BTD, the cache, or with `keep_kv`
        the pass's keys and values: a tuple per layer, or stacked over layers by the scan)."""
        cfg = self.cfg
        kw = dict(cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention, lora=self.lora,
                  keep_kv=keep_kv)
        sliding = [cfg.is_sliding(i) for i in range(cfg.n_layers)]
        carry = (x_BTD, cache)
        if not self.scan_layers:
            block = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
            kvs = []
            for i in range(cfg.n_layers):
                layer_prefix = None if prefix is None else (prefix.k[i], prefix.v[i])
                carry, kv = block(**kw, name=layer_name(i))(carry, i, sliding[i], positions_BT, key_mask_BS,
                                                             cache_index, segment_ids_BT, layer_prefix)
                kvs.append(kv)
            return (carry[0], KVCache(*map(tuple, zip(*kvs)))) if keep_kv else carry
        # Layers that all slide or all attend fully keep a static flag; a mix scans the flag with the params.
        uniform = len(set(sliding)) == 1
        # What a scan keeps for the backward pass is decided here, not by XLA, which cannot see across the loop:
        # every elementwise intermediate of every layer would be kept (43 GiB per device instead of 19 for
        # Qwen2.5-0.5B's PPO step). Without remat the matmul outputs are kept and the cheap rest recomputed.
        policy = None if self.remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        block = nn.remat(Block, prevent_cse=False, policy=policy)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast if uniform else 0) + (nn.broadcast,) * 4 + (0,),
                        length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: STACKED})
        flags = sliding[0] if uniform else jnp.asarray(sliding)
        if prefix is not None:  # the scan reads layer i's slice of keys and values stacked over layers
            prefix = tuple(jnp.stack(x) if isinstance(x, tuple) else x for x in prefix)
        carry, kv = stack(**kw, name=STACKED)(carry, jnp.arange(cfg.n_layers), flags, positions_BT, key_mask_BS,
                                              cache_index, segment_ids_BT, prefix)
        return (carry[0], KVCache(*kv)) if keep_kv else carry


def head_logits(model: Transformer, x_BTD: jax.Array, head_w: jax.Array) -> jax.Array:
    """float32 logits_BTV of the LM head `head_w` (`lm_head_weight`) on final-norm outputs (soft-capped where the
    family caps them). Both heads keep the float32 accumulator: bf16-rounded logits would make PPO's ratios
    rounding noise. A tied head is the embedding multiplied in its own (V, D) layout: as its transpose, XLA's
    CPU backend copied the whole embedding transposed, and its gradient back, in every training step."""
    logits_BTV = dense(model.dtype, x_BTD, head_w, jnp.float32, w_transposed=model.cfg.tie_embeddings)
    return softcap(logits_BTV, model.cfg.final_softcap)


def lm_head_weight(model: Transformer, params) -> jax.Array:
    """The LM head's matrix in `params`, in the compute dtype: the embedding (V, D) when tied, else lm_head (D, V)."""
    head_w = params["embed"] if model.cfg.tie_embeddings else params["lm_head"]
    return head_w.astype(model.dtype)


def make_model(cfg: ModelConfig, head: str = "lm", dtype: str = "float32", param_dtype: str = "float32",
               remat: bool = False, attention: AttentionImpl = "auto", lora: LoraSpec | None = None,
               scan_layers: bool | None = None) -> Transformer:
    """`scan_layers` None: scan when the model has more than SCAN_LAYERS_ABOVE layers."""
    if lora is not None:
        check_family(cfg)
    scan = cfg.n_layers > SCAN_LAYERS_ABOVE if scan_layers is None else scan_layers
    return Transformer(cfg, head=head, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat,
                       attention=attention, lora=lora, scan_layers=scan)


def params_for(model: Transformer, params: dict) -> dict:
    """`params` (either layout: a checkpoint's per-layer subtrees or a scanned stack) in the model's layout."""
    return in_layout(params, model.scan_layers, model.cfg.n_layers)


def without_adapters(model: Transformer) -> Transformer:
    """The model before any LoRA adapter (a LoRA policy's reference, on its base params); the model itself when
    it has none."""
    return model if model.lora is None else model.clone(lora=None)


def init_params(model: Transformer, rng: jax.Array) -> dict:
    """Random parameters, unboxed (logical names are read separately with `param_logical_axes`)."""
    return nn.unbox(init_boxed(model, rng))


def init_boxed(model: Transformer, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, tokens, jnp.ones((1, 1), bool))["params"]


def param_logical_axes(model: Transformer):
    """Pytree of logical axis-name tuples matching the params, without allocating any weights."""
    boxed = jax.eval_shape(lambda: init_boxed(model, jax.random.key(0)))
    return nn.get_partition_spec(boxed)


def forward(model: Transformer, params, tokens_BT, mask_BT):
    """Full, uncached pass over a (possibly left-padded) batch with positions from the mask."""
    out, _ = model.apply({"params": params}, tokens_BT, positions_from_mask(mask_BT), mask_BT)
    return out


def shared_prompt_pass(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN, group: int,
                       rngs=None) -> jax.Array:
    """The model's outputs (an LM's final hidden states x_B(N+1)D, a scalar head's values_B(N+1)) at the prompt's
    last position and at every response token, as the full pass gives them, for rows in runs of `group`
    consecutive rows sharing a prompt: each prompt's pass runs once, and its keys and values serve the run's
    responses, whose pass attends to them (the gradients of a run's rows add up in them). The group's prompts
    are read from its first row."""
    P = prompt_ids_BP.shape[1]
    share = lambda x: jnp.repeat(x, group, axis=0)  # per prompt -> per row
    ids_bP, mask_bP = prompt_ids_BP[::group], prompt_mask_BP[::group].astype(bool)
    last_b1, kv_b = model.apply({"params": params}, ids_bP, positions_from_mask(mask_bP), mask_bP, head_last=1,
                                hidden=True, keep_kv=True, rngs=rngs)
    key_mask_BS = jnp.concatenate([share(mask_bP), mask_BN.astype(bool)], axis=1)  # the prompt's slots first
    # k_(L)BKHP and v_(L)BKPH: rows at axis -4
    prefix = jax.tree.map(lambda x: jnp.repeat(x, group, axis=x.ndim - 4), kv_b)
    out_BN, _ = model.apply({"params": params}, tokens_BN, positions_from_mask(key_mask_BS)[:, P:], key_mask_BS,
                            hidden=True, prefix=prefix, rngs=rngs)
    return jnp.concatenate([share(last_b1), out_BN], axis=1)
