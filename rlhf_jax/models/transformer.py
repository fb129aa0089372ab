"""One decoder-only transformer family: GPT-2, Llama 2/3 and Qwen2 variants.

Parameters are plain pytrees with logical axis names (Linen `with_logical_partitioning`); the KV cache is an
explicit pytree passed in and returned. Projections are fused (q/k/v grouped per KV head, gate/up stacked) so
that a decode step issues few, large matmuls and tensor parallelism splits along whole KV groups.

Shape suffixes: B batch, T query length, S key length (cache slots), D model width, K KV heads,
G query heads per KV head, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Family = Literal["gpt2", "llama", "qwen2"]
AttentionImpl = Literal["auto", "einsum", "cudnn"]
PAD_ID = -1  # never a real token: masks carry the truth and the model embeds out-of-range ids as 0
NEG_INF = -1e30  # finite, so masking never forms inf - inf (every row also keeps one allowed key, see Attention)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture; built from a HF config.json by `rlhf_jax.models.hf_config`, or directly for tests and the demo."""

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling: 'default' | 'linear' | 'llama3' with its factors (HF semantics).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


class KVCache(NamedTuple):
    """Per-layer keys and values, `k_BSKH` of every layer stacked in a tuple."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, slots, cfg.n_kv_heads, cfg.head_dim)
        make = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return cls(make(), make())


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row; left padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies with HF's rope_scaling rules ('default', 'linear', 'llama3')."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_type == "default":
        return inv_freq
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {cfg.rope_type!r}; supported: default, linear, llama3")


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_H2: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout), computed in float32."""
    angles_BTH2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_H2
    cos = jnp.cos(angles_BTH2)[:, :, None, :]
    sin = jnp.sin(angles_BTH2)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def _einsum(dtype, spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """float32 compute means float32 matmuls on every backend (GPUs would otherwise use TF32); bf16 is the
    fast path. `out_dtype=jnp.float32` keeps a bf16 matmul's float32 accumulator instead of rounding it."""
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=out_dtype)


def _cudnn_attention_available() -> bool:
    """An NVIDIA GPU that cuDNN's fused attention runs on (Ampere or newer); never on CPU, TPU or ROCm."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if "cuda" not in device.client.platform_version.lower() or capability is None:
        return False
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0)


def _use_cudnn_attention(impl: AttentionImpl, dtype, full_pass: bool, T: int, H: int) -> bool:
    """cuDNN flash attention for bf16 full-sequence passes (training, teacher forcing, scoring). float32 keeps
    the HIGHEST-precision einsum and cached decode keeps the einsum. The shape limits are cuDNN's: head dim a
    multiple of 8 up to 128, and an even length (its backward pass with a mask needs one)."""
    if not full_pass or impl == "einsum":
        return False
    if impl == "cudnn":
        return True
    return (jnp.dtype(dtype) == jnp.bfloat16 and H % 8 == 0 and H <= 128 and T % 2 == 0
            and _cudnn_attention_available())


def _param(module: nn.Module, name: str, shape, axes, init, dtype):
    """Declares a parameter with its logical axis names (used by `rlhf_jax.runtime.sharding`)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense_init(scale: float = 0.02):
    return nn.initializers.normal(stddev=scale)


_score_init = _dense_init()  # the scalar head, in the Transformer and in `init_scalar_head` alike


def init_scalar_head(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> jax.Array:
    """A fresh `score` weight (d_model, 1), drawn as the Transformer draws it: turns an LM into a reward or
    value model without initialising a whole random model."""
    return _score_init(rng, (cfg.d_model, 1), dtype)


class Norm(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        d = self.cfg.d_model
        scale = _param(self, "scale", (d,), ("norm",), nn.initializers.ones, self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        if self.cfg.is_gpt2:  # LayerNorm with bias
            bias = _param(self, "bias", (d,), ("norm",), nn.initializers.zeros, self.param_dtype)
            mean = x.mean(-1, keepdims=True)
            var = jnp.square(x - mean).mean(-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale + bias
        else:  # RMSNorm
            y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.cfg.norm_eps) * scale
        return y.astype(x_BTD.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, key_mask_BS, layer_cache, cache_index, segment_ids_BT=None):
        cfg = self.cfg
        D, K, G, H = cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
        B, T, _ = x_BTD.shape
        # Per KV head: its G query heads, then its key head, then its value head.
        w_qkv = _param(self, "qkv", (D, K, G + 2, H), ("embed", "kv_heads", None, "head_dim"),
                            _dense_init(), self.param_dtype)
        qkv_BTKCH = _einsum(self.dtype, "btd,dkch->btkch", x_BTD, w_qkv.astype(self.dtype))
        if cfg.qkv_bias or cfg.is_gpt2:
            b_qkv = _param(self, "qkv_bias", (K, G + 2, H), ("kv_heads", None, "head_dim"),
                                nn.initializers.zeros, self.param_dtype)
            qkv_BTKCH = qkv_BTKCH + b_qkv.astype(self.dtype)
        q_BTKGH = qkv_BTKCH[:, :, :, :G]
        k_BTKH = qkv_BTKCH[:, :, :, G]
        v_BTKH = qkv_BTKCH[:, :, :, G + 1]
        if not cfg.is_gpt2:
            inv_freq = rope_inv_freq(cfg)
            q_BTKGH = apply_rope(q_BTKGH.reshape(B, T, K * G, H), positions_BT, inv_freq).reshape(B, T, K, G, H)
            k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

        if layer_cache is None:  # full sequence: keys are this call's tokens
            k_BSKH, v_BSKH = k_BTKH, v_BTKH
            query_slot_T = jnp.arange(T)
            new_cache = None
        else:  # write this call's keys into the cache in place, attend over every slot
            k_cache, v_cache = layer_cache
            start = (0, cache_index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), start)
            v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), start)
            query_slot_T = cache_index + jnp.arange(T)
            new_cache = (k_BSKH, v_BSKH)
        S = k_BSKH.shape[1]
        causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
        allowed_BTS = causal_TS[None] & key_mask_BS[:, None, :].astype(bool)
        if segment_ids_BT is not None:  # packed rows: attend only within one's own example
            allowed_BTS = allowed_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
        # A left-pad query has no allowed key; letting it see its own slot leaves no row fully masked, so no
        # implementation can give NaN. Real tokens already see their own slot, so their outputs are unchanged.
        allowed_BTS = allowed_BTS | (jnp.arange(S)[None, :] == query_slot_T[:, None])[None]

        k_BSKH, v_BSKH = k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype)
        if _use_cudnn_attention(self.attention, self.dtype, layer_cache is None, T, H):
            # Query head k * G + g uses KV head k, which is dot_product_attention's GQA grouping too.
            out_BTNH = jax.nn.dot_product_attention(
                q_BTKGH.reshape(B, T, K * G, H).astype(self.dtype), k_BSKH, v_BSKH, mask=allowed_BTS[:, None],
                scale=1 / math.sqrt(H), implementation="cudnn")
        else:
            # float32 scores even for bf16 inputs: rounding logits to bf16 before the softmax costs accuracy.
            scores_BKGTS = _einsum(self.dtype, "btkgh,bskh->bkgts", q_BTKGH, k_BSKH, out_dtype=jnp.float32)
            scores_BKGTS = scores_BKGTS / math.sqrt(H)
            scores_BKGTS = jnp.where(allowed_BTS[:, None, None], scores_BKGTS, NEG_INF)
            probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(self.dtype)
            out_BTKGH = _einsum(self.dtype, "bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
            out_BTNH = out_BTKGH.reshape(B, T, K * G, H)

        w_o = _param(self, "o", (K * G, H, D), ("heads", "head_dim", "embed"), _dense_init(), self.param_dtype)
        out_BTD = _einsum(self.dtype, "btnh,nhd->btd", out_BTNH, w_o.astype(self.dtype))
        if cfg.is_gpt2:
            b_o = _param(self, "o_bias", (D,), ("embed",), nn.initializers.zeros, self.param_dtype)
            out_BTD = out_BTD + b_o.astype(self.dtype)
        return out_BTD, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        gated = not cfg.is_gpt2
        n_in = 2 if gated else 1  # SwiGLU stacks gate and up into one matmul
        has_bias = cfg.is_gpt2 or cfg.mlp_bias
        w_in = _param(self, "wi", (cfg.d_model, n_in, cfg.d_ff), ("embed", None, "mlp"),
                           _dense_init(), self.param_dtype)
        h_BTCF = _einsum(self.dtype, "btd,dcf->btcf", x_BTD, w_in.astype(self.dtype))
        if has_bias:
            b_in = _param(self, "wi_bias", (n_in, cfg.d_ff), (None, "mlp"), nn.initializers.zeros,
                               self.param_dtype)
            h_BTCF = h_BTCF + b_in.astype(self.dtype)
        if gated:
            h_BTF = jax.nn.silu(h_BTCF[:, :, 0]) * h_BTCF[:, :, 1]
        else:
            h_BTF = jax.nn.gelu(h_BTCF[:, :, 0], approximate=True)  # GPT-2's gelu_new
        w_out = _param(self, "wo", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), _dense_init(), self.param_dtype)
        out_BTD = _einsum(self.dtype, "btf,fd->btd", h_BTF, w_out.astype(self.dtype))
        if has_bias:
            b_out = _param(self, "wo_bias", (cfg.d_model,), ("embed",), nn.initializers.zeros,
                                self.param_dtype)
            out_BTD = out_BTD + b_out.astype(self.dtype)
        return out_BTD


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, key_mask_BS, layer_cache, cache_index, segment_ids_BT=None):
        kw = dict(cfg=self.cfg, param_dtype=self.param_dtype)
        h, new_cache = Attention(**kw, dtype=self.dtype, attention=self.attention, name="attn")(
            Norm(**kw, name="attn_norm")(x_BTD), positions_BT, key_mask_BS, layer_cache, cache_index, segment_ids_BT
        )
        x_BTD = x_BTD + h
        x_BTD = x_BTD + MLP(**kw, dtype=self.dtype, name="mlp")(Norm(**kw, name="mlp_norm")(x_BTD))
        return x_BTD, new_cache


class Transformer(nn.Module):
    """Decoder LM. `head='lm'` returns float32 logits_BTV; `head='scalar'` returns float32 values_BT.
    `attention`: 'auto' uses cuDNN fused attention for bf16 full passes on NVIDIA GPUs and the einsum
    elsewhere; 'einsum' always the einsum; 'cudnn' cuDNN for every full pass (bf16/fp16 on a GPU only)."""

    cfg: ModelConfig
    head: Literal["lm", "scalar"] = "lm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: AttentionImpl = "auto"

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, key_mask_BS, cache: KVCache | None = None, cache_index=0,
                 head_last: int = 0, segment_ids_BT=None):
        """Full pass when `cache` is None (key_mask_BS is then the T-token mask), else a cached step that writes
        slots [cache_index, cache_index + T) and attends over every valid slot. `segment_ids_BT` (full pass
        only) keeps packed examples apart. `head_last` > 0 applies the final norm and head to the last
        `head_last` positions only (the sampler's prefill needs 1; log-probs of a response, its length + 1).
        Returns (out, new_cache)."""
        cfg = self.cfg
        kw = dict(cfg=cfg, param_dtype=self.param_dtype)
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                _dense_init(), self.param_dtype)
        # jnp.take wraps negative ids (a pad of -1 reads the last vocab row, a real token) and gives NaN rows
        # for ids outside [-V, V): embed every out-of-range id as id 0 instead.
        tokens_BT = jnp.where((tokens_BT >= 0) & (tokens_BT < cfg.vocab_size), tokens_BT, 0)
        x_BTD = jnp.take(embedding, tokens_BT, axis=0).astype(self.dtype)
        if cfg.is_gpt2:
            wpe = _param(self, "pos_embed", (cfg.max_position_embeddings, cfg.d_model), (None, "embed"),
                              _dense_init(0.01), self.param_dtype)
            x_BTD = x_BTD + jnp.take(wpe, positions_BT, axis=0).astype(self.dtype)

        block_cls = nn.remat(Block, static_argnums=()) if self.remat else Block
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, layer_new = block_cls(**kw, dtype=self.dtype, attention=self.attention, name=f"layer_{i}")(
                x_BTD, positions_BT, key_mask_BS, layer_cache, cache_index, segment_ids_BT
            )
            if layer_new is not None:
                new_k.append(layer_new[0])
                new_v.append(layer_new[1])
        new_cache = KVCache(tuple(new_k), tuple(new_v)) if cache is not None else None

        if head_last:
            x_BTD = x_BTD[:, -head_last:]
        x_BTD = Norm(**kw, name="final_norm")(x_BTD)
        if self.head == "scalar":
            w = _param(self, "score", (cfg.d_model, 1), ("embed", None), _score_init, self.param_dtype)
            return _einsum(self.dtype, "btd,do->bto", x_BTD, w.astype(self.dtype), jnp.float32)[..., 0], new_cache
        if cfg.tie_embeddings:
            w_DV = embedding.astype(self.dtype).T
        else:
            w_DV = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), _dense_init(),
                               self.param_dtype).astype(self.dtype)
        # Both heads keep the float32 accumulator: bf16-rounded logits would make PPO's ratios rounding noise.
        return _einsum(self.dtype, "btd,dv->btv", x_BTD, w_DV, jnp.float32), new_cache


def make_model(cfg: ModelConfig, head: str = "lm", dtype: str = "float32", param_dtype: str = "float32",
               remat: bool = False, attention: AttentionImpl = "auto") -> Transformer:
    return Transformer(cfg, head=head, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat,
                       attention=attention)


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
