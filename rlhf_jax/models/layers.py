"""The transformer's layers: RoPE, norms, attention (full, sliding-window, soft-capped; einsum or cuDNN) and the
MLP, for every variation a `ModelConfig` describes.

Shape suffixes: B batch, T query length, S key length (cache slots), D model width, K KV heads,
G query heads per KV head, N = K * G query heads, H head dim, F MLP width.

Keys are held head dim before slots (k_BKHS), values slots before head dim (v_BKSH): the orders in which the
query-key and probability-value products read them. With keys slots first, XLA's CPU backend multiplies a decode
step's whole key cache by its few queries (G output columns per row and KV head), which takes about twice as long;
full passes run the same either way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.lora import LoraSpec, matrix_shape

AttentionImpl = Literal["auto", "einsum", "cudnn"]
NEG_INF = -1e30  # finite, so masking never forms inf - inf (every row also keeps one allowed key, see Attention)
# Queries (rows x positions) attended per chunk outside cuDNN: a chunk's float32 scores are N x QUERY_ROWS x S,
# not B x N x T x S (gigabytes per layer for a prefill of hundreds of prompts, or passes of 1-2k tokens). A pass
# of B rows takes QUERY_ROWS // B positions per chunk; smaller passes (and every decode step) are one chunk.
QUERY_ROWS = 4096
# A full pass within one chunk (queries in the last slots, every key before them) never forms the scores of a
# query with a later key: its queries attend in blocks, each over the keys up to its own last query (about half the
# scores of a causal pass). Blocks of at least 128 queries, at most 16 of them: each block compiles to kernels of
# its own, and on CPU smaller blocks skip too little to pay for theirs (a pass of 256 positions runs no faster in 4
# blocks than in 2 or 1, one of 512 is 6% faster in 4).
QUERY_BLOCK_MIN = 128
QUERY_BLOCKS_MAX = 16


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies with HF's rope_scaling rules ('default', 'linear', 'llama3'); `local`: a sliding
    layer's own base (Gemma 3's rope_local_base_freq), which HF never scales."""
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta is not None else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_type == "default" or (local and cfg.rope_local_theta is not None):
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


def _precision(dtype):
    """float32 compute means float32 matmuls on every backend (GPUs would otherwise use TF32); bf16 is the fast
    path."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def einsum(dtype, spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """`jnp.einsum` at the compute dtype's precision. `out_dtype=jnp.float32` keeps a bf16 matmul's float32
    accumulator instead of rounding it."""
    return jnp.einsum(spec, a, b, precision=_precision(dtype), preferred_element_type=out_dtype)


def dense(dtype, x: jax.Array, w: jax.Array, out_dtype=None, w_transposed: bool = False) -> jax.Array:
    """x (..., K) times a two-dimensional weight, w (K, N) or with `w_transposed` (N, K): one matmul over x's
    leading axes flattened, whose gradients XLA's CPU backend forms without copies (as a (B, T, K) einsum it
    copied the output's gradient transposed for the weight's: an untied LM head's backward took 1.12 against
    0.76 s per chunk of 8 x 128 positions at SmolLM2-135M's shapes). `out_dtype` as `einsum`'s."""
    out = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (1 if w_transposed else 0,)), ((), ())),
                              precision=_precision(dtype), preferred_element_type=out_dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping, tanh(x / cap) * cap; the identity without a cap."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(query_slot_T, key_mask_BS, window: int | None, seg_q_BT=None, seg_k_BS=None) -> jax.Array:
    """allowed_BTS: which cache slots each query sees (causal by slot, within `window` slots when given, valid
    keys, same packed segment). A query may always see its own slot: a left-pad query has no allowed key, and
    its own slot leaves no row fully masked, so no implementation can give NaN; real tokens already see it."""
    S = key_mask_BS.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
    if window is not None:  # by slot distance, as HF's masks; rows are contiguous
        causal_TS = causal_TS & (query_slot_T[:, None] - jnp.arange(S)[None, :] < window)
    allowed_BTS = causal_TS[None] & key_mask_BS[:, None, :].astype(bool)
    if seg_q_BT is not None:  # packed rows: attend only within one's own example
        allowed_BTS = allowed_BTS & (seg_q_BT[:, :, None] == seg_k_BS[:, None, :])
    return allowed_BTS | (jnp.arange(S)[None, :] == query_slot_T[:, None])[None]


def einsum_attention(cfg: ModelConfig, dtype, q_BTKGH, k_BKHS, v_BKSH, allowed_BTS) -> jax.Array:
    """Softmax attention of every query over all S keys, as einsums; returns out_BTKGH."""
    H = q_BTKGH.shape[-1]
    if jax.default_backend() == "cpu" and q_BTKGH.dtype != jnp.float32:
        # XLA's CPU dot has no bf16 x bf16 -> float32 for keys head dim first; the float32 product of bf16 values is
        # the same number
        q_BTKGH, k_BKHS = q_BTKGH.astype(jnp.float32), k_BKHS.astype(jnp.float32)
    # float32 scores even for bf16 inputs: rounding logits to bf16 before the softmax costs accuracy. The queries
    # on the left (jnp.einsum would put the keys there), so that a decode step reads the keys in the order it
    # multiplies them
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    scores_BKTGS = jax.lax.dot_general(q_BTKGH, k_BKHS, (((4,), (2,)), ((0, 2), (0, 1))), precision=precision,
                                       preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKTGS.swapaxes(2, 3)
    if cfg.query_pre_attn_scalar is None:
        scores_BKGTS = scores_BKGTS / math.sqrt(H)
    else:
        scores_BKGTS = scores_BKGTS * cfg.query_pre_attn_scalar ** -0.5
    scores_BKGTS = softcap(scores_BKGTS, cfg.attn_softcap)
    scores_BKGTS = jnp.where(allowed_BTS[:, None, None], scores_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
    # the matmul's own output order (batch, then the probabilities' rows): XLA then keeps the probabilities as the
    # left operand, where with the output already in BTKGH order it reads V transposed, which CPU backends do slowly
    return einsum(dtype, "bkgts,bksh->bkgth", probs_BKGTS, v_BKSH).transpose(0, 3, 1, 2, 4)


def query_block(T: int) -> int:
    """Queries per causal block of a full pass of T positions within one chunk; T or more: one block."""
    return max(QUERY_BLOCK_MIN, -(-T // QUERY_BLOCKS_MAX))


def chunked_attention(cfg: ModelConfig, dtype, q_BTKGH, k_BKHS, v_BKSH, query_slot_T, key_mask_BS,
                      window: int | None, segment_ids_BT, chunk: int, full_pass: bool) -> jax.Array:
    """`einsum_attention` over chunks of `chunk` queries, each chunk's mask built from its own rows; returns
    out_BTKGH. T <= chunk is one chunk: exactly the unchunked computation, or for a `full_pass` (the queries hold
    the last T of the S key slots) causal blocks (`query_block`) where the queries up to b attend to the first
    S - T + b keys only (the same softmax: the keys left out were masked). Longer, the queries are padded to a
    multiple of `chunk` (the padded rows' outputs are dropped) and a `lax.map` attends chunk by chunk, its body
    rematerialised so that the backward pass keeps no chunk's probabilities: memory O(B*N*chunk*S)."""
    B, T, K, G, H = q_BTKGH.shape
    S = v_BKSH.shape[2]

    def attend(q_BCKGH, slot_C, seg_BC, keys=S):
        seg_k_BS = None if segment_ids_BT is None else segment_ids_BT[:, :keys]
        allowed_BCS = attention_mask(slot_C, key_mask_BS[:, :keys], window, seg_BC, seg_k_BS)
        return einsum_attention(cfg, dtype, q_BCKGH, k_BKHS[..., :keys], v_BKSH[:, :, :keys], allowed_BCS)

    if T <= chunk and full_pass:
        block = query_block(T)
        seg = lambda a: None if segment_ids_BT is None else segment_ids_BT[:, a:a + block]
        return jnp.concatenate([attend(q_BTKGH[:, a:a + block], query_slot_T[a:a + block], seg(a),
                                       keys=S - T + min(a + block, T)) for a in range(0, T, block)], axis=1)
    if T <= chunk:
        return attend(q_BTKGH, query_slot_T, segment_ids_BT)
    n = -(-T // chunk)
    pad = n * chunk - T
    # A padded row's zero slot (or segment) only needs to keep its softmax finite: its output is dropped.
    to_chunks = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
        B, n, chunk, *x.shape[2:]).swapaxes(0, 1)
    q_nBCKGH = to_chunks(q_BTKGH)
    slot_nC = jnp.pad(query_slot_T, (0, pad)).reshape(n, chunk)
    seg_nBC = None if segment_ids_BT is None else to_chunks(segment_ids_BT)
    out_nBCKGH = jax.lax.map(lambda xs: jax.checkpoint(attend, prevent_cse=False)(*xs), (q_nBCKGH, slot_nC, seg_nBC))
    return out_nBCKGH.swapaxes(0, 1).reshape(B, n * chunk, K, G, H)[:, :T]


def _cudnn_attention_available() -> bool:
    """An NVIDIA GPU that cuDNN's fused attention runs on (Ampere or newer); never on CPU, TPU or ROCm."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if "cuda" not in device.client.platform_version.lower() or capability is None:
        return False
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0)


def _use_cudnn_attention(impl: AttentionImpl, dtype, full_pass: bool, T: int, H: int,
                         softcapped: bool = False) -> bool:
    """cuDNN flash attention for bf16 full-sequence passes (training, teacher forcing, scoring). float32 keeps
    the HIGHEST-precision einsum and cached decode keeps the einsum; so do soft-capped scores, which cuDNN's
    call cannot express. The shape limits are cuDNN's: head dim a multiple of 8 up to 128, and an even length
    (its backward pass with a mask needs one)."""
    if not full_pass or impl == "einsum" or softcapped:
        return False
    if impl == "cudnn":
        return True
    return (jnp.dtype(dtype) == jnp.bfloat16 and H % 8 == 0 and H <= 128 and T % 2 == 0
            and _cudnn_attention_available())


def param(module: nn.Module, name: str, shape, axes, init, dtype):
    """Declares a parameter with its logical axis names (used by `rlhf_jax.runtime.sharding`)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(scale: float = 0.02):
    return nn.initializers.normal(stddev=scale)


class LoraDelta(nn.Module):
    """One target's LoRA update x_BTI @ A @ B * alpha / R (`rlhf_jax.models.lora`), added to its projection's
    output. The adapter is kept in float32 (its optimizer moments are tiny); B starts at zero, so a fresh adapter
    adds exactly 0. Dropout on the input applies only where the caller passes a 'dropout' rng (training steps)."""

    cfg: ModelConfig
    spec: LoraSpec
    target: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTI):
        I, O = matrix_shape(self.cfg, self.target)
        bound = 1.0 / math.sqrt(I)  # PEFT's default: Kaiming-uniform with a = sqrt(5)
        a = param(self, "a_IR", (I, self.spec.rank), (None, None),
                  lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound), jnp.float32)
        b = param(self, "b_RO", (self.spec.rank, O), (None, None), nn.initializers.zeros, jnp.float32)
        if self.spec.dropout and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.spec.dropout, x_BTI.shape)
            x_BTI = jnp.where(keep, x_BTI / (1.0 - self.spec.dropout), 0).astype(x_BTI.dtype)
        h_BTR = dense(self.dtype, x_BTI, a.astype(self.dtype))
        return dense(self.dtype, h_BTR, (b * self.spec.scale).astype(self.dtype))


def lora_delta(module: nn.Module, spec: LoraSpec | None, target: str, x_BTI, dtype):
    """The target's LoRA update of `x_BTI` when the model adapts it, else None."""
    if spec is None or target not in spec.targets:
        return None
    return LoraDelta(cfg=module.cfg, spec=spec, target=target, dtype=dtype, name=f"{target}_lora")(x_BTI)


class Norm(nn.Module):
    """LayerNorm with bias (GPT-2) or RMSNorm over the last axis, in float32; Gemma's RMSNorm scales by (1 + w)
    (its checkpoints store w, initialised at 0). `dim`: the normalised width, d_model unless given."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32
    dim: int | None = None

    @nn.compact
    def __call__(self, x):
        d = self.dim or self.cfg.d_model
        init = nn.initializers.zeros if self.cfg.is_gemma else nn.initializers.ones
        scale = param(self, "scale", (d,), ("norm",), init, self.param_dtype)
        x32 = x.astype(jnp.float32)
        if self.cfg.is_gpt2:  # LayerNorm with bias
            bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros, self.param_dtype)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale + bias
        else:  # RMSNorm
            y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.cfg.norm_eps)
            y = y * (1.0 + scale.astype(jnp.float32)) if self.cfg.is_gemma else y * scale
        return y.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over this call's tokens or a KV cache. `sliding`: this layer attends within
    cfg.sliding_window cache slots (and, with cfg.rope_local_theta, rotates by its local RoPE base)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"
    sliding: bool = False
    lora: LoraSpec | None = None
    query_chunk: int | None = None  # query positions per chunk outside cuDNN; None: QUERY_ROWS // B (at call time)

    @nn.compact
    def __call__(self, x_BTD, positions_BT, key_mask_BS, layer_cache, cache_index, segment_ids_BT=None,
                 cache_layer=None, sliding_flag=None, prefix_kv=None, keep_kv: bool = False):
        """`layer_cache`: (k_BKHS, v_BKSH) of this layer, or with `cache_layer` every layer's (a tuple per layer, or
        k_LBKHS, v_LBKSH stacked), written and read at that (possibly traced) index. `sliding_flag`: a traced bool that
        overrides `sliding` (a scanned stack whose layers differ). Full pass only: `prefix_kv` (k_BKHP, v_BKPH), the
        keys and values of P tokens before this call's, which it attends to as to a read-only cache (key_mask_BS
        then covers P + T slots); `keep_kv`: return this call's (k_BKHT, v_BKTH) in place of the cache.
        Returns (out_BTD, the written cache, this call's keys and values, or None)."""
        cfg = self.cfg
        D, K, G, H = cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
        B, T, _ = x_BTD.shape
        # Per KV head: its G query heads, then its key head, then its value head.
        w_qkv = param(self, "qkv", (D, K, G + 2, H), ("embed", "kv_heads", None, "head_dim"), dense_init(),
                      self.param_dtype)
        qkv_BTKCH = einsum(self.dtype, "btd,dkch->btkch", x_BTD, w_qkv.astype(self.dtype))
        if cfg.qkv_bias or cfg.is_gpt2:
            b_qkv = param(self, "qkv_bias", (K, G + 2, H), ("kv_heads", None, "head_dim"), nn.initializers.zeros,
                          self.param_dtype)
            qkv_BTKCH = qkv_BTKCH + b_qkv.astype(self.dtype)
        # one split, not three slices: its gradient is one concatenation, where each slice's is a zero-padded copy
        q_BTKGH, k_BTK1H, v_BTK1H = jnp.split(qkv_BTKCH, [G, G + 1], axis=3)
        k_BTKH, v_BTKH = k_BTK1H[:, :, :, 0], v_BTK1H[:, :, :, 0]
        if (dq := lora_delta(self, self.lora, "q", x_BTD, self.dtype)) is not None:  # HF's q row (k * G + g) * H + h
            q_BTKGH = q_BTKGH + dq.reshape(B, T, K, G, H)
        if (dk := lora_delta(self, self.lora, "k", x_BTD, self.dtype)) is not None:
            k_BTKH = k_BTKH + dk.reshape(B, T, K, H)
        if (dv := lora_delta(self, self.lora, "v", x_BTD, self.dtype)) is not None:
            v_BTKH = v_BTKH + dv.reshape(B, T, K, H)
        if cfg.qk_norm:  # per head, before RoPE
            q_BTKGH = Norm(cfg=cfg, param_dtype=self.param_dtype, dim=H, name="q_norm")(q_BTKGH)
            k_BTKH = Norm(cfg=cfg, param_dtype=self.param_dtype, dim=H, name="k_norm")(k_BTKH)
        sliding = self.sliding if sliding_flag is None else sliding_flag
        window = _window(cfg, sliding)
        if not cfg.is_gpt2:
            inv_freq = (rope_inv_freq(cfg, local=sliding) if isinstance(sliding, bool) else
                        jnp.where(sliding, rope_inv_freq(cfg, local=True), rope_inv_freq(cfg)))
            q_BTKGH = apply_rope(q_BTKGH.reshape(B, T, K * G, H), positions_BT, inv_freq).reshape(B, T, K, G, H)
            k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

        if layer_cache is None:  # full sequence: keys are this call's tokens, after the prefix's when there is one
            k_BKHS, v_BKSH = k_BTKH.transpose(0, 2, 3, 1), v_BTKH.swapaxes(1, 2)
            new_cache = (k_BKHS, v_BKSH) if keep_kv else None
            query_slot_T = jnp.arange(T)
            if prefix_kv is not None:
                k_BKHS = jnp.concatenate([prefix_kv[0].astype(k_BKHS.dtype), k_BKHS], axis=3)
                v_BKSH = jnp.concatenate([prefix_kv[1].astype(v_BKSH.dtype), v_BKSH], axis=2)
                query_slot_T = prefix_kv[1].shape[2] + query_slot_T
        else:  # write this call's keys into the cache in place, attend over every slot
            (k_cache, k_BKHS), (v_cache, v_BKSH) = (
                _write_cache(cache, x, cache_layer, cache_index, slot_axis)
                for cache, x, slot_axis in zip(layer_cache, (k_BTKH.transpose(0, 2, 3, 1), v_BTKH.swapaxes(1, 2)),
                                               (3, 2)))
            new_cache = (k_cache, v_cache)
            query_slot_T = cache_index + jnp.arange(T)
        k_BKHS, v_BKSH = k_BKHS.astype(self.dtype), v_BKSH.astype(self.dtype)
        full_pass = layer_cache is None and prefix_kv is None
        if _use_cudnn_attention(self.attention, self.dtype, full_pass, T, H, cfg.attn_softcap is not None):
            allowed_BTS = attention_mask(query_slot_T, key_mask_BS, window, segment_ids_BT, segment_ids_BT)
            scale = 1 / math.sqrt(H) if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
            # Query head k * G + g uses KV head k, which is dot_product_attention's GQA grouping too.
            out_BTNH = jax.nn.dot_product_attention(
                q_BTKGH.reshape(B, T, K * G, H).astype(self.dtype), k_BKHS.transpose(0, 3, 1, 2),
                v_BKSH.swapaxes(1, 2),
                mask=allowed_BTS[:, None],
                scale=scale, implementation="cudnn")
        else:
            chunk = max(1, QUERY_ROWS // B) if self.query_chunk is None else self.query_chunk
            out_BTKGH = chunked_attention(cfg, self.dtype, q_BTKGH, k_BKHS, v_BKSH, query_slot_T, key_mask_BS,
                                          window, segment_ids_BT, chunk, full_pass=layer_cache is None)
            out_BTNH = out_BTKGH.reshape(B, T, K * G, H)

        w_o = param(self, "o", (K * G, H, D), ("heads", "head_dim", "embed"), dense_init(), self.param_dtype)
        # heads and head_dim merged into one contraction: as two, jnp.einsum contracts them in (h, n) order and XLA
        # copies both operands transposed (the weight too, every decode step)
        out_BTX = out_BTNH.reshape(B, T, K * G * H)
        out_BTD = dense(self.dtype, out_BTX, w_o.reshape(K * G * H, D).astype(self.dtype))
        if (do := lora_delta(self, self.lora, "o", out_BTX, self.dtype)) is not None:
            out_BTD = out_BTD + do
        if cfg.is_gpt2:
            b_o = param(self, "o_bias", (D,), ("embed",), nn.initializers.zeros, self.param_dtype)
            out_BTD = out_BTD + b_o.astype(self.dtype)
        return out_BTD, new_cache


def _window(cfg: ModelConfig, sliding):
    """The layer's window in cache slots: None when it attends to everything; with a traced `sliding`, a traced
    width that is beyond any cache for a full layer."""
    if cfg.sliding_window is None or sliding is False:
        return None
    if sliding is True:
        return cfg.sliding_window
    return jnp.where(sliding, cfg.sliding_window, jnp.iinfo(jnp.int32).max)


def _write_cache(cache, new, layer, index, slot_axis: int):
    """(the cache with this call's keys or values `new` (in the cache's layout, its slots at `slot_axis` of a
    layer's 4) written from slot `index`, this layer's keys or values after it). `cache`: this layer's array
    (`layer` None), a tuple of every layer's, or one array stacked over layers."""
    start = tuple(index if axis == slot_axis else 0 for axis in range(4))
    write = lambda c, start: jax.lax.dynamic_update_slice(c, new.astype(c.dtype).reshape(
        (1,) * (c.ndim - 4) + new.shape), start)
    if layer is None:
        out = write(cache, start)
        return out, out
    if isinstance(cache, tuple):  # a Python loop's layers: replacing one entry copies nothing
        out = write(cache[layer], start)
        return cache[:layer] + (out,) + cache[layer + 1:], out
    out = write(cache, (layer, *start))
    return out, out[layer]


class MLP(nn.Module):
    """GPT-2's GELU MLP, SwiGLU (Llama, Qwen, Mistral) or GeGLU (Gemma, tanh-approximated GELU)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        gated = not cfg.is_gpt2
        n_in = 2 if gated else 1  # the gated MLPs stack gate and up into one matmul
        has_bias = cfg.is_gpt2 or cfg.mlp_bias
        w_in = param(self, "wi", (cfg.d_model, n_in, cfg.d_ff), ("embed", None, "mlp"), dense_init(),
                     self.param_dtype)
        h_BTCF = einsum(self.dtype, "btd,dcf->btcf", x_BTD, w_in.astype(self.dtype))
        if has_bias:
            b_in = param(self, "wi_bias", (n_in, cfg.d_ff), (None, "mlp"), nn.initializers.zeros, self.param_dtype)
            h_BTCF = h_BTCF + b_in.astype(self.dtype)
        gate_BTF, up_BTF = ((x[:, :, 0] for x in jnp.split(h_BTCF, 2, axis=2)) if gated else (h_BTCF[:, :, 0], None))
        if (d := lora_delta(self, self.lora, "gate", x_BTD, self.dtype)) is not None:
            gate_BTF = gate_BTF + d
        if (d := lora_delta(self, self.lora, "up", x_BTD, self.dtype)) is not None:
            up_BTF = up_BTF + d
        if cfg.is_gemma:
            h_BTF = jax.nn.gelu(gate_BTF, approximate=True) * up_BTF  # gelu_pytorch_tanh
        elif gated:
            h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        else:
            h_BTF = jax.nn.gelu(gate_BTF, approximate=True)  # GPT-2's gelu_new
        w_out = param(self, "wo", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), dense_init(), self.param_dtype)
        out_BTD = dense(self.dtype, h_BTF, w_out.astype(self.dtype))
        if (d := lora_delta(self, self.lora, "down", h_BTF, self.dtype)) is not None:
            out_BTD = out_BTD + d
        if has_bias:
            b_out = param(self, "wo_bias", (cfg.d_model,), ("embed",), nn.initializers.zeros, self.param_dtype)
            out_BTD = out_BTD + b_out.astype(self.dtype)
        return out_BTD
