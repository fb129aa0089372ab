"""Query-chunked attention (`chunked_attention` in rlhf_jax/models/layers.py): chunks of a few queries give the
unchunked outputs, caches and gradients to float32 rounding in every case the Attention module handles (GQA,
left padding, sliding windows, Gemma 2's soft-cap and query_pre_attn_scalar, packed segments, prefill into a
cache); both agree with a per-query float64 loop; and chunking shrinks a backward pass's temporaries."""

import math

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import layers
from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.layers import Attention
from rlhf_jax.models.transformer import forward, init_params, make_model

B, T, D = 3, 11, 32  # T = 11: chunks of 3 or 4 leave a remainder
WINDOW = 4
PADS = (0, 3, 7)  # left padding per row


def tiny(family="llama", **changes) -> ModelConfig:
    base = dict(family=family, vocab_size=64, d_model=D, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48)
    return ModelConfig(**{**base, **changes})


GEMMA2 = dict(family="gemma2", sliding_window=WINDOW, query_pre_attn_scalar=24.0, attn_softcap=2.0)


def _left_padded_mask(pads=PADS, width=T):
    return np.arange(width)[None, :] >= np.array(pads)[:, None]


def _positions(mask_BT, start=0):
    return (start + np.maximum(np.cumsum(mask_BT, axis=-1) - 1, 0)).astype(np.int32)


# Each case: config, sliding, mask_BT (None: no padding), segment ids (None: none), prefill into a cache.
CASES = {
    "causal": (tiny(), False, None, None, False),
    "left_padding": (tiny(), False, _left_padded_mask(), None, False),
    "sliding_window": (tiny("mistral", sliding_window=WINDOW), True, _left_padded_mask(), None, False),
    "gemma2_softcap_scalar": (tiny(**GEMMA2), True, _left_padded_mask(), None, False),
    "packed_segments": (tiny("qwen3"), False, None,
                        np.array([[1] * 4 + [2] * 7, [1] * 6 + [2] * 2 + [3] * 3, [0] * 3 + [1] * 8]), False),
    "prefill_into_cache": (tiny(), False, _left_padded_mask(), None, True),
    "prefill_sliding": (tiny(**GEMMA2), True, _left_padded_mask(), None, True),
}
CACHE_INDEX, SLOTS = 3, 16  # prefill writes slots [3, 14) of 16: slots 14, 15 are empty


def _inputs(cfg, mask_BT, prefill, seed=0):
    """x_BTD, positions_BT, key_mask_BS, layer_cache, cache_index; a prefill's cache holds random old keys."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = np.ones((B, T), bool) if mask_BT is None else mask_BT
    if not prefill:
        return x, _positions(mask), mask, None, 0
    # Old slots [0, 3) are valid in row 0 only; the other rows start with padding.
    key_mask = np.zeros((B, SLOTS), bool)
    key_mask[:, CACHE_INDEX:CACHE_INDEX + T] = mask
    key_mask[0, :CACHE_INDEX] = True
    start = np.array([CACHE_INDEX, 0, 0])[:, None]
    # KVCache's layout: heads before slots, keys' head dim before their slots
    k_shape, v_shape = (B, cfg.n_kv_heads, cfg.head_dim, SLOTS), (B, cfg.n_kv_heads, SLOTS, cfg.head_dim)
    cache = (rng.standard_normal(k_shape).astype(np.float32), rng.standard_normal(v_shape).astype(np.float32))
    return x, _positions(mask, start), key_mask, cache, CACHE_INDEX


def _params(cfg, sliding, inputs, seed=0):
    """The module's parameters with every tensor perturbed, so scores vary well beyond a near-uniform softmax."""
    x, pos, key_mask, cache, ci = inputs
    params = nn.unbox(Attention(cfg=cfg, sliding=sliding).init(jax.random.key(seed), x, pos, key_mask, cache, ci))
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda p: (p + 0.3 * rng.standard_normal(p.shape)).astype(np.float32), params)


def _value_and_grads(cfg, sliding, chunk, params, inputs, seg):
    """(out_BTD, new_cache), and the gradients of a random projection of both w.r.t. params, x and the cache."""
    x, pos, key_mask, cache, ci = inputs
    module = Attention(cfg=cfg, sliding=sliding, attention="einsum", query_chunk=chunk)
    rng = np.random.default_rng(7)
    w_out = rng.standard_normal((B, T, D)).astype(np.float32)
    w_cache = None if cache is None else [rng.standard_normal(c.shape).astype(np.float32) for c in cache]

    def loss(params, x, cache):
        out, new_cache = module.apply(params, x, pos, key_mask, cache, ci, seg)
        total = jnp.sum(out * w_out)
        if new_cache is not None:
            total = total + jnp.sum(new_cache[0] * w_cache[0]) + jnp.sum(new_cache[1] * w_cache[1])
        return total, (out, new_cache)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, aux), grads = fn(params, x, cache)
    return aux, grads, _pieces(lambda: module.apply(params, x, pos, key_mask, cache, ci, seg))


def _pieces(forward) -> str:
    """How a forward pass attended: "one" (a single pass over all keys), "blocks" (causal query blocks, each a
    pair of matmuls beside the two projections) or "loop" (chunks in lax.maps)."""
    jaxpr = str(jax.make_jaxpr(forward)())
    if "scan" in jaxpr:
        return "loop"
    return "blocks" if jaxpr.count("dot_general") > 4 else "one"


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_attention_matches_unchunked(case):
    cfg, sliding, mask_BT, seg, prefill = CASES[case]
    inputs = _inputs(cfg, mask_BT, prefill)
    params = _params(cfg, sliding, inputs)
    ref, ref_grads, ref_pieces = _value_and_grads(cfg, sliding, 64, params, inputs, seg)
    assert ref_pieces == "one"  # T <= chunk and shorter than a query block
    assert np.all(np.isfinite(ref[0]))
    # chunks of 3 and 4 queries: loops (a full pass in two causal segments of them); within one chunk of 64,
    # causal blocks of 3 queries for a full pass, where a prefill into a cache is one chunk
    for chunk, block_min in ((3, layers.QUERY_BLOCK_MIN), (4, layers.QUERY_BLOCK_MIN), (64, 3)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layers, "QUERY_BLOCK_MIN", block_min)
            got, grads, pieces = _value_and_grads(cfg, sliding, chunk, params, inputs, seg)
        assert pieces == ("loop" if chunk < T else "one" if prefill else "blocks"), (chunk, block_min)
        for a, b in zip(jax.tree.leaves((ref, ref_grads)), jax.tree.leaves((got, grads)), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            # float32 rounding of the array's scale: the chunks' matmuls may sum in another order
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max(), err_msg=f"{case}, chunk {chunk}")


# ------------------------------------------------------------------------------------------ a float64 oracle


def _rope(x_TNH, positions_T, theta):
    H = x_TNH.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, H, 2) / H)
    angles = positions_T[:, None, None] * inv_freq
    x1, x2 = x_TNH[..., : H // 2], x_TNH[..., H // 2:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)],
                          axis=-1)


def _oracle(cfg, sliding, params, inputs, seg):
    """Softmax attention one query and one head at a time, in float64 (families without q/k norms or biases).
    Query t sits at slot cache_index + t and sees slot j when j <= its slot, within the window on a sliding
    layer, j is a valid key and (packed) of its own segment; or when j is its own slot."""
    x, pos, key_mask, cache, ci = inputs
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]
    K, G, H = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
    scale = 1 / math.sqrt(H) if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    out = np.zeros((B, T, D))
    for b in range(B):
        qkv = np.einsum("td,dkch->tkch", x[b].astype(np.float64), p["qkv"])
        q = _rope(qkv[:, :, :G].reshape(T, K * G, H), pos[b], cfg.rope_theta)
        k_new = _rope(qkv[:, :, G], pos[b], cfg.rope_theta)
        if cache is None:
            k_slots, v_slots = k_new, qkv[:, :, G + 1]
        else:
            k_slots = cache[0][b].transpose(2, 0, 1).astype(np.float64)  # slots, then heads
            v_slots = cache[1][b].swapaxes(0, 1).astype(np.float64)
            k_slots[ci:ci + T], v_slots[ci:ci + T] = k_new, qkv[:, :, G + 1]
        heads = np.zeros((T, K * G, H))
        for t in range(T):
            slot = ci + t
            for n in range(K * G):
                weights, values = [], []
                for j in range(k_slots.shape[0]):
                    seen = j <= slot and bool(key_mask[b, j])
                    seen &= not (sliding and cfg.sliding_window is not None and slot - j >= cfg.sliding_window)
                    seen &= seg is None or seg[b, t] == seg[b, j]
                    if seen or j == slot:
                        s = float(q[t, n] @ k_slots[j, n // G]) * scale
                        if cfg.attn_softcap is not None:
                            s = math.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
                        weights.append(s)
                        values.append(v_slots[j, n // G])
                w = np.exp(np.array(weights) - max(weights))
                heads[t, n] = (w / w.sum()) @ np.array(values)
        out[b] = np.einsum("tnh,nhd->td", heads, p["o"])
    return out


ORACLE_CASES = {
    "gemma2_packed_left_padded": (tiny(**GEMMA2), True, _left_padded_mask(),
                                  np.array([[1] * 4 + [2] * 7, [0] * 3 + [1] * 5 + [2] * 3, [0] * 7 + [1] * 4]),
                                  False),
    "llama_prefill": CASES["prefill_into_cache"],
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_attention_matches_a_per_query_loop(case):
    cfg, sliding, mask_BT, seg, prefill = ORACLE_CASES[case]
    inputs = _inputs(cfg, mask_BT, prefill, seed=3)
    params = _params(cfg, sliding, inputs, seed=3)
    want = _oracle(cfg, sliding, params, inputs, seg)
    x, pos, key_mask, cache, ci = inputs
    for chunk in (4, 64):
        module = Attention(cfg=cfg, sliding=sliding, attention="einsum", query_chunk=chunk)
        got, _ = module.apply(params, x, pos, key_mask, cache, ci, seg)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5, err_msg=f"{case}, chunk {chunk}")


# ------------------------------------------------------------------------------------------ the whole model


def test_the_transformer_chunks_with_the_module_constant(monkeypatch):
    """Transformer builds Attention without `query_chunk`: QUERY_ROWS // B, read at call time, decides."""
    cfg = tiny("gemma3", n_layers=3, sliding_window=WINDOW, layer_types=("sliding_attention", "full_attention",
               "sliding_attention"), query_pre_attn_scalar=20.0, tie_embeddings=True)
    model = make_model(cfg, attention="einsum")
    params = init_params(model, jax.random.key(0))
    mask = _left_padded_mask()
    ids = np.where(mask, np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T)), 0).astype(np.int32)
    want = jax.jit(lambda p: forward(model, p, ids, mask))(params)
    monkeypatch.setattr(layers, "QUERY_ROWS", 4 * B)  # chunks of 4 positions
    assert "scan" in str(jax.make_jaxpr(lambda p: forward(model, p, ids, mask))(params))
    got = jax.jit(lambda p: forward(model, p, ids, mask))(params)  # traced anew: reads the patched constant
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ memory


def _grad_cost(T, chunk, d_model=64):
    """(temporary bytes, FLOPs) of an Attention layer's compiled forward + backward pass at B = 2."""
    cfg = tiny(d_model=d_model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, d_model)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    mask = jnp.ones((2, T), bool)
    params = Attention(cfg=cfg).init(jax.random.key(0), x, pos, mask, None, 0)
    module = Attention(cfg=cfg, attention="einsum", query_chunk=chunk)
    loss = lambda p, x: jnp.sum(module.apply(p, x, pos, mask, None, 0)[0] ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.cost_analysis()["flops"]


def test_chunking_shrinks_the_backward_pass_temporaries():
    """Forward + backward at T = 256: chunks of 32 queries need several times less scratch memory than one chunk
    of 256 (whose float32 scores, causal blocks of them, are about B * N * T * T / 2 * 4 bytes = 1 MiB here,
    kept for the backward pass)."""
    Tm = 256
    (whole, _), (chunked, _) = _grad_cost(Tm, Tm), _grad_cost(Tm, 32)
    print(f"temporaries: chunk {Tm}: {whole} bytes, chunk 32: {chunked} bytes ({whole / chunked:.1f}x)")
    assert whole >= 2 * 4 * Tm * Tm // 2 * 4
    assert whole >= 2 * chunked


def test_causal_blocks_skip_the_scores_of_later_keys(monkeypatch):
    """A full pass within one chunk attends in causal blocks (4 of 128 queries at T = 512): about 5/8 of one
    block's FLOPs and, kept for the backward pass, of its probabilities; as one block (QUERY_BLOCK_MIN = T) it
    forms every query's scores with every key."""
    Tm = 512
    assert layers.query_block(Tm) == 128
    blocked_bytes, blocked_flops = _grad_cost(Tm, Tm, d_model=16)
    monkeypatch.setattr(layers, "QUERY_BLOCK_MIN", Tm)
    assert layers.query_block(Tm) == Tm
    whole_bytes, whole_flops = _grad_cost(Tm, Tm, d_model=16)
    print(f"one block: {whole_bytes} bytes, {whole_flops:.3g} FLOPs; blocks: {blocked_bytes}, {blocked_flops:.3g}")
    assert blocked_flops <= 0.75 * whole_flops
    assert blocked_bytes <= 0.75 * whole_bytes
