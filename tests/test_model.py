"""Numerics of the transformer and sampler against ground truth: transformers' PyTorch models, the uncached
forward pass, unpadded rows, a single device, and a teacher-forced recomputation."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from compile_helpers import jit_forward
from hf_fixtures import FAMILIES, VOCAB, make_hf_model
from rlhf_jax.models import hf, layers
from rlhf_jax.models.hf_config import config_from_hf
from rlhf_jax.models import tokenizer
from rlhf_jax.runtime import sharding
from rlhf_jax.models.transformer import (
    PAD_ID, Attention, KVCache, ModelConfig, forward, init_params, init_scalar_head, make_model, param_logical_axes,
    positions_from_mask)
from rlhf_jax.errors import UserError
from rlhf_jax.models.sampling import (
    SamplingParams, _draw, _filter_logits, _inverse_cdf, categorical_from_uniforms, sample,
    teacher_forced_logprobs, tokenizer_vocab)



@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_hf_model(name, path))
    return out


def _left_padded_batch(seed=0, batch=4, width=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, width)).astype(np.int32)
    mask = np.ones((batch, width), bool)
    for row, pad in enumerate([0, 3, 7, 11][:batch]):
        mask[row, :pad] = False
    return np.where(mask, ids, 0), mask


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(hf_models, name):
    path, torch_model = hf_models[name]
    cfg, head, params = hf.load_hf(path)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          # left padding: a row's first real token is at position 0 (counted here, not by ours)
                          position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long)).logits
    ours = jit_forward(make_model(cfg), params, ids, mask)
    np.testing.assert_allclose(np.asarray(ours)[mask], ref.numpy()[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_transformers(hf_models, name):
    path, torch_model = hf_models[name]
    cfg, _, params = hf.load_hf(path)
    ids, mask = _left_padded_batch(seed=1)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=32,
                                   min_new_tokens=32, do_sample=False, eos_token_id=[], pad_token_id=0)
    p = SamplingParams(max_new_tokens=32, temperature=0.0)
    out = jax.jit(lambda pr, i, m: sample(make_model(cfg), pr, i, m, jax.random.key(0), p))(params, ids, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens_BN), ref[:, ids.shape[1]:].numpy())


@pytest.fixture(scope="module")
def llama(hf_models):
    cfg, _, params = hf.load_hf(hf_models["llama_gqa_llama3"][0])
    return cfg, make_model(cfg), params


@pytest.fixture(scope="module")
def gpt2(hf_models):
    cfg, _, params = hf.load_hf(hf_models["gpt2"][0])
    return cfg, make_model(cfg), params


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_cached_decode_equals_full_forward(request, which):
    cfg, model, params = request.getfixturevalue(which)
    ids, mask = _left_padded_batch(seed=2)
    full = np.asarray(jax.jit(lambda p: forward(model, p, ids, mask))(params))
    apply = jax.jit(lambda p, *args: model.apply({"params": p}, *args))  # one program for every decode step
    prefix = 5  # prefill 5 tokens, then feed the remaining 7 one at a time through the cache
    cache = KVCache.zeros(cfg, ids.shape[0], ids.shape[1])
    key_mask = np.concatenate([mask[:, :prefix], np.zeros_like(mask[:, prefix:])], axis=1)
    positions = np.asarray(positions_from_mask(mask))
    step_logits = []
    logits, cache = apply(params, ids[:, :prefix], positions[:, :prefix], key_mask, cache, 0)
    step_logits.append(np.asarray(logits))
    for t in range(prefix, ids.shape[1]):
        key_mask[:, t] = mask[:, t]
        logits, cache = apply(params, ids[:, t:t + 1], positions[:, t:t + 1], key_mask, cache, t)
        step_logits.append(np.asarray(logits))
    cached = np.concatenate(step_logits, axis=1)
    np.testing.assert_allclose(cached[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_left_padding_does_not_change_logits(request, which):
    cfg, model, params = request.getfixturevalue(which)
    ids, mask = _left_padded_batch(seed=3)
    run = jax.jit(lambda p, i, m: forward(model, p, i, m))
    padded = np.asarray(run(params, ids, mask))
    for row in range(ids.shape[0]):
        real = ids[row][mask[row]][None]
        alone = np.asarray(run(params, real, np.ones_like(real, bool)))[0]
        np.testing.assert_allclose(padded[row][mask[row]], alone, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (4, 1, 2)])
def test_mesh_of_8_equals_one_device(llama, mesh_shape, monkeypatch):
    cfg, model, params = llama
    monkeypatch.setattr(layers, "QUERY_ROWS", 8 * 5)  # attention in chunks of 5 queries (and a remainder of 2)
    ids, mask = _left_padded_batch(seed=4, batch=8)
    mask[4:] = mask[:4]
    one = np.asarray(jax.jit(lambda p, i, m: forward(model, p, i, m))(params, ids, mask))
    mesh = sharding.make_mesh(mesh_shape, ("data", "fsdp", "tensor"))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    param_sh = sharding.param_shardings(param_logical_axes(model), shapes, mesh)
    placed = sharding.place(params, param_sh)
    assert any(len(s.device_set) > 1 and not s.is_fully_replicated for s in jax.tree.leaves(param_sh)) or \
        mesh_shape == (8, 1, 1)
    batch_sh = sharding.batch_sharding(mesh)
    fwd = jax.jit(lambda p, i, m: forward(model, p, i, m), in_shardings=(param_sh, batch_sh, batch_sh))
    np.testing.assert_allclose(np.asarray(fwd(placed, ids, mask)), one, atol=1e-5)
    p = SamplingParams(max_new_tokens=8, temperature=0.0)
    samp = lambda pr, i, m: sample(model, pr, i, m, jax.random.key(0), p).tokens_BN
    sharded = jax.jit(samp, in_shardings=(param_sh, batch_sh, batch_sh), out_shardings=batch_sh)(placed, ids, mask)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(samp)(params, ids, mask)))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 10, 0.9), (0.0, 0, 1.0)])
def test_sampler_logprobs_equal_teacher_forced(llama, temperature, top_k, top_p):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=5)
    p = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=(1, 2), pad_id=-1)
    out = jax.jit(lambda pr, i, m, r: sample(model, pr, i, m, r, p))(params, ids, mask, jax.random.key(7))
    tf = jax.jit(lambda pr: teacher_forced_logprobs(model, pr, ids, mask, out.tokens_BN, out.mask_BN, temperature))(
        params)
    np.testing.assert_allclose(np.asarray(out.logprobs_BN), np.asarray(tf), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_ids_past_the_tokenizers_are_never_drawn_and_no_log_prob_counts_them(llama, temperature):
    """A model whose vocabulary has more rows than its tokenizer has ids (Qwen2.5: 151,936 for 151,665) samples
    over the tokenizer's ids: the log-probs are those of a softmax over them alone, as a numpy oracle computes."""
    cfg, model, params = llama
    vocab = cfg.vocab_size // 2
    ids, mask = _left_padded_batch(seed=5)
    p = SamplingParams(max_new_tokens=16, temperature=temperature, pad_id=-1, vocab=vocab)
    out = jax.jit(lambda pr, i, m, r: sample(model, pr, i, m, r, p))(params, ids, mask, jax.random.key(7))
    tokens, real = np.asarray(out.tokens_BN), np.asarray(out.mask_BN)
    assert real.all() and tokens.max() < vocab
    ids_BT, mask_BT = np.concatenate([ids, tokens], 1), np.concatenate([mask, real], 1)
    logits = np.asarray(jit_forward(model, params, ids_BT, mask_BT), np.float64)[:, ids.shape[1] - 1:-1, :vocab]
    logits /= temperature or 1.0
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    oracle = np.take_along_axis(logits, tokens[..., None], -1)[..., 0] - log_z
    np.testing.assert_allclose(np.asarray(out.logprobs_BN), oracle, atol=1e-4)
    tf = jax.jit(lambda pr: teacher_forced_logprobs(model, pr, ids, mask, out.tokens_BN, out.mask_BN, temperature,
                                                    vocab=vocab))(params)
    np.testing.assert_allclose(np.asarray(tf), oracle, atol=1e-4)
    full = SamplingParams(max_new_tokens=16, temperature=1.0, pad_id=-1)
    unlimited = jax.jit(lambda pr, i, m, r: sample(model, pr, i, m, r, full))(params, ids, mask, jax.random.key(7))
    assert np.asarray(unlimited.tokens_BN).max() >= vocab  # the limit is what keeps them out


def test_tokenizer_vocab_is_set_only_where_the_model_pads_its_vocabulary():
    class Tokenizer:
        def __len__(self):
            return 90

    assert tokenizer_vocab(Tokenizer(), ModelConfig(family="llama", vocab_size=96, d_model=8, n_layers=1, n_heads=1,
                                                    n_kv_heads=1, head_dim=8, d_ff=8)) == 90
    assert tokenizer_vocab(Tokenizer(), ModelConfig(family="llama", vocab_size=90, d_model=8, n_layers=1, n_heads=1,
                                                    n_kv_heads=1, head_dim=8, d_ff=8)) is None


def test_eos_truncates_and_masks(llama):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=6)
    eos = tuple(range(3, 40))  # a large EOS set so that every row stops early
    p = SamplingParams(max_new_tokens=16, temperature=1.0, eos_ids=eos, pad_id=-1)
    out = jax.device_get(jax.jit(lambda pr: sample(model, pr, ids, mask, jax.random.key(3), p))(params))
    stopped = 0
    for tokens, lps, m in zip(out.tokens_BN, out.logprobs_BN, out.mask_BN):
        hits = np.flatnonzero(np.isin(tokens, eos))
        length = hits[0] + 1 if len(hits) else len(tokens)
        stopped += bool(len(hits))
        np.testing.assert_array_equal(m, np.arange(len(tokens)) < length)  # first EOS is a real token
        assert (tokens[length:] == -1).all() and (lps[length:] == 0).all()
        assert (lps[:length] < 0).all()
    assert stopped == len(out.tokens_BN)


def test_top_k_and_top_p_filters_match_brute_force():
    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.5), (7, 0.8), (0, 1e-6)]:
        got = np.isfinite(np.asarray(_filter_logits(jnp.asarray(logits), top_k, top_p)))
        for row in range(logits.shape[0]):
            order = np.argsort(-logits[row])
            keep = np.zeros(50, bool)
            kept_mass, probs = 0.0, np.exp(logits[row] - logits[row].max())
            if top_k:
                probs[order[top_k:]] = 0
            probs /= probs.sum()
            for rank, tok in enumerate(order[: top_k or 50]):
                if kept_mass >= top_p:
                    break
                keep[tok] = True
                kept_mass += probs[tok]
            np.testing.assert_array_equal(got[row], keep)
    # a row that needs every token (49 of 50 equal ones hold 0.98 < 0.999) keeps every one, the least likely too
    flat = np.zeros((2, 50), np.float32)
    flat[1, 7] = -0.5
    assert np.isfinite(np.asarray(_filter_logits(jnp.asarray(flat), 0, 0.999))).all()


@pytest.mark.parametrize("vocab", [7, 50, 300])
def test_inverse_cdf_draws_follow_the_softmax_and_never_a_filtered_token(vocab):
    """400k draws per case: every token's frequency is within 5 standard errors of its softmax probability
    (vocabularies that fill their blocks or not), and a token at -inf (filtered, or in an all -inf block) never
    comes."""
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(size=vocab) * 2).astype(np.float32)
    logits[rng.choice(vocab, vocab // 4 + 1, replace=False)] = -np.inf
    if vocab > 16:
        logits[8:16] = -np.inf  # a whole block (of 8 or 32 tokens) partly or fully filtered
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    n = 400_000
    draws = jax.jit(lambda k: categorical_from_uniforms(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)),
                                                        *jax.random.uniform(k, (2, n))))(jax.random.key(3))
    freq = np.bincount(np.asarray(draws), minlength=vocab) / n
    assert freq.shape == (vocab,)
    np.testing.assert_array_equal(freq[probs == 0], 0.0)
    z = np.abs(freq - probs) / np.sqrt(probs * (1 - probs) / n + 1e-30)
    assert z.max() < 5, (z.max(), freq, probs)


def test_inverse_cdf_edges_never_pick_a_zero_weight():
    """u = 0 picks the first token of positive weight; u just below 1, where rounding can push u x total past the
    last cumulative weight, picks the last of positive weight."""
    weights = jnp.asarray([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0, 0.0, 1.0]], jnp.float32)
    first = _inverse_cdf(weights, jnp.zeros(2))
    np.testing.assert_array_equal(np.asarray(first), [1, 0])
    last = _inverse_cdf(weights, jnp.full(2, np.nextafter(np.float32(1), np.float32(0))))
    np.testing.assert_array_equal(np.asarray(last), [3, 5])
    over = _inverse_cdf(weights, jnp.full(2, 1.5))  # past the total: still a token of positive weight
    np.testing.assert_array_equal(np.asarray(over), [3, 5])


def test_the_draw_resolves_a_heavy_tail_inside_one_block():
    """Exact draw frequencies on a fine grid of both uniforms, V = 4096 (64 blocks of 64): block 5 holds one
    token of 1e-3 of the mass and 63 of 1e-7 each, below one float32 uniform's 2^-23 resolution of the whole
    mass. The grid's block frequencies follow the block masses, and inside block 5 every tail token is drawn at
    its share of the block."""
    V, S, n = 4096, 64, 1 << 16
    probs = np.full(V, 0.0)
    probs[5 * S] = 1e-3
    probs[5 * S + 1:6 * S] = 1e-7
    rest = np.r_[0:5 * S, 6 * S:V]
    probs[rest] = (1 - probs.sum()) / len(rest)
    logits = jnp.asarray(np.log(probs), jnp.float32)
    grid = jnp.asarray((np.arange(n) + 0.5) / n, jnp.float32)
    draw = jax.jit(lambda u_block, u_within: categorical_from_uniforms(
        jnp.broadcast_to(logits, (n, V)), u_block, u_within))

    block_freq = np.bincount(np.asarray(draw(grid, jnp.full(n, 0.5))) // S, minlength=V // S) / n
    np.testing.assert_allclose(block_freq, probs.reshape(-1, S).sum(1), atol=2 / n)
    before = probs.reshape(-1, S).sum(1)[:5].sum()
    in_block_5 = jnp.full(n, before + probs[5 * S:6 * S].sum() / 2, jnp.float32)
    tokens = np.asarray(draw(in_block_5, grid))
    assert np.all(tokens // S == 5)
    within = np.bincount(tokens - 5 * S, minlength=S) / n
    share = probs[5 * S:6 * S] / probs[5 * S:6 * S].sum()
    np.testing.assert_allclose(within, share, atol=2 / n)
    assert np.all(within[1:] > 0)  # each tail token (p = 1e-7 overall) is drawn


def test_draw_frequencies_follow_the_temperature_of_the_logprobs():
    """At T = 0.5 the drawn tokens follow softmax(logits / 0.5), and the returned log-prob is that of
    log_softmax(logits / 0.5) at the drawn token: a draw at another temperature than the log-probs' fails."""
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    probs = np.exp(logits / 0.5 - (logits / 0.5).max())
    probs /= probs.sum()
    n = 200_000
    p = SamplingParams(max_new_tokens=1, temperature=0.5)
    tokens, logprobs = jax.jit(lambda k: _draw(jnp.broadcast_to(jnp.asarray(logits), (n, 5)),
                                               jax.random.uniform(k, (n, 2)), p))(jax.random.key(0))
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    z = np.abs(freq - probs) / np.sqrt(probs * (1 - probs) / n)
    assert z.max() < 5, (freq, probs)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[np.asarray(tokens)], rtol=1e-5, atol=1e-6)


def test_a_tiny_temperature_samples_the_greedy_tokens_with_finite_logprobs():
    """Logits / T of 1e9 and more: shifted by the row's maximum first, the top token keeps exp(0) = 1 however
    the rest round (divided first, XLA's fused shift left every exp at 0 in the decode loop: token 0, NaN)."""
    from rlhf_jax.models.tiny import tiny_config

    model = make_model(tiny_config(64, 3, 0))
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, init_params(model, jax.random.key(0)))
    ids = np.random.default_rng(0).integers(4, 64, (8, 6)).astype(np.int32)
    mask = np.ones((8, 6), bool)
    run = jax.jit(lambda t: sample(model, params, ids, mask, jax.random.key(0), SamplingParams(12, t)),
                  static_argnums=0)
    greedy, tiny = run(0.0), run(1e-9)
    np.testing.assert_array_equal(np.asarray(tiny.tokens_BN), np.asarray(greedy.tokens_BN))
    assert np.isfinite(np.asarray(tiny.logprobs_BN)).all()


def test_top_k_beyond_the_vocabulary_is_refused_in_one_line(llama):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=2)
    p = SamplingParams(max_new_tokens=2, top_k=cfg.vocab_size + 1)
    with pytest.raises(UserError, match=f"sampling.top_k={cfg.vocab_size + 1} exceeds the model's vocabulary of "
                                        f"{cfg.vocab_size} tokens"):
        sample(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), p)


def test_remat_gives_same_gradients(llama):
    cfg, _, params = llama
    ids, mask = _left_padded_batch(seed=8)

    def loss(model, p):
        return jnp.where(mask, forward(model, p, ids, mask).max(-1), 0.0).sum()

    g_plain = jax.jit(jax.grad(lambda p: loss(make_model(cfg), p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(make_model(cfg, remat=True), p)))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_bfloat16_compute_keeps_the_heads_float32_accumulator(llama, head):
    """bf16 compute stays close to float32, and both heads' outputs are the float32 accumulator, not bf16
    values cast up: rounded logits (spacing 1/16 at 10) would make PPO's ratios and KL rounding noise."""
    cfg, _, params = llama
    if head == "scalar":
        params = {**{k: v for k, v in params.items() if k != "lm_head"},
                  "score": init_scalar_head(cfg, jax.random.key(1)) * 50}
    ids, mask = _left_padded_batch(seed=9)
    f32 = np.asarray(jit_forward(make_model(cfg, head), params, ids, mask))
    bf16 = np.asarray(jit_forward(make_model(cfg, head, dtype="bfloat16"), params, ids, mask))
    assert bf16.dtype == np.float32
    scale = max(1.0, np.abs(f32[mask]).max())
    np.testing.assert_allclose(bf16[mask], f32[mask], atol=5e-2 * scale)
    representable = bf16[mask] == bf16[mask].astype(jnp.bfloat16).astype(np.float32)
    assert representable.mean() < 0.2, representable.mean()


FULL_SIZE = {
    "llama3_8b": (dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192, rope_type="llama3"),
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
                  8_030_261_248),
    "qwen2.5_7b": (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        tie_word_embeddings=False, eos_token_id=151643),
                   7_615_616_512),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_configs_build_abstractly(name):
    hf_config, n_params = FULL_SIZE[name]
    cfg, head = config_from_hf(hf_config)
    model = make_model(cfg, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_params
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    param_sh = sharding.param_shardings(param_logical_axes(model), shapes, mesh)
    embed_sh = param_sh["embed"]
    assert embed_sh.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    logits = jax.eval_shape(lambda p, i: forward(model, p, i, jnp.ones(i.shape, bool)), shapes, ids)
    assert logits.shape == (8, 16, cfg.vocab_size) and logits.dtype == jnp.float32


def test_packed_rows_equal_separate_examples(llama):
    """Two examples packed into one row with segment ids and restarting positions give each example's logits."""
    cfg, model, params = llama
    rng = np.random.default_rng(10)
    a, b = rng.integers(3, VOCAB, 5), rng.integers(3, VOCAB, 4)
    ids = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    packed, _ = jax.jit(lambda p: model.apply({"params": p}, ids, positions, segments > 0, segment_ids_BT=segments))(
        params)
    run = jax.jit(lambda p, i: forward(model, p, i, jnp.ones(i.shape, bool)))
    for tokens, sl in ((a, slice(0, 5)), (b, slice(5, 9))):
        alone = run(params, tokens[None])
        np.testing.assert_allclose(np.asarray(packed)[0, sl], np.asarray(alone)[0], atol=1e-5)


def _scaled_qkv(params, cfg, factor):
    """Larger q/k/v weights, so that attention is peaked (scores of several units) rather than near uniform."""
    params = dict(params)
    for i in range(cfg.n_layers):
        attn = {**params[f"layer_{i}"]["attn"]}
        attn["qkv"] = attn["qkv"] * factor
        params[f"layer_{i}"] = {**params[f"layer_{i}"], "attn": attn}
    return params


def test_bf16_attention_scores_are_not_rounded_to_bf16():
    """Attention alone with bf16-exact q/k/v (one-hot inputs, bf16-exact weights, positions 0 so that RoPE is the
    identity): bf16 scores then differ from float32 only by the score dot's output rounding. Rounding them to bf16
    before the softmax gave relative errors of 0.009-0.013 here (3 seeds); float32 scores give 0.003-0.004."""
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=96)
    B, T = 4, 32
    mask = np.ones((B, T), bool)
    for row, pad in enumerate([0, 3, 10, 20]):
        mask[row, :pad] = False
    positions = np.zeros((B, T), np.int32)
    for seed in range(3):
        k_init, k_w, k_x = jax.random.split(jax.random.key(seed), 3)
        params = Attention(cfg).init(k_init, jnp.zeros((1, 1, cfg.d_model)), positions[:1, :1], mask[:1, :1], None, 0)
        params = jax.tree.map(lambda w: (jax.random.normal(k_w, w.shape) * 3).astype(jnp.bfloat16).astype(jnp.float32),
                              params)
        x_BTD = jax.nn.one_hot(jax.random.randint(k_x, (B, T), 0, cfg.d_model), cfg.d_model)
        ref, _ = Attention(cfg).apply(params, x_BTD, positions, mask, None, 0)
        bf16, _ = Attention(cfg, dtype=jnp.bfloat16).apply(params, x_BTD.astype(jnp.bfloat16), positions, mask, None, 0)
        ref = np.asarray(ref)[mask]
        rel_err = np.abs(np.asarray(bf16, np.float32)[mask] - ref).max() / np.abs(ref).max()
        assert rel_err < 0.006, (seed, rel_err)


def _dot_generals(jaxpr):
    """Every dot_general in a jaxpr, nested calls (jit, remat, custom rules) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


@pytest.mark.parametrize("backend, operands", [("gpu", jnp.bfloat16), ("cpu", jnp.float32)])
def test_bf16_forward_computes_attention_scores_in_float32(llama, monkeypatch, backend, operands):
    """bf16 queries and keys with a float32 product; on CPU, whose dot lacks that, their float32 copies."""
    cfg, _, params = llama
    ids, mask = _left_padded_batch(seed=11)
    T = ids.shape[1]  # 12: no other dimension of this model is 12, so two T-sized dims mark a score dot
    model = make_model(cfg, dtype="bfloat16", attention="einsum")  # the path every backend can take
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jaxpr = jax.make_jaxpr(lambda p: forward(model, p, ids, mask))(params).jaxpr
    score_dots = [e for e in _dot_generals(jaxpr) if e.outvars[0].aval.shape.count(T) == 2]
    assert len(score_dots) == cfg.n_layers  # one score dot per layer
    for eqn in score_dots:
        assert [v.aval.dtype for v in eqn.invars] == [operands, operands]
        assert eqn.outvars[0].aval.dtype == jnp.float32


def test_fused_attention_call_matches_einsum(llama, monkeypatch):
    """The `jax.nn.dot_product_attention` call (GQA grouping, mask, scale, layout) with XLA's implementation
    standing in for cuDNN, which CPUs lack: same logits as the einsum path, padded and packed rows included."""
    cfg, _, params = llama
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
    ids, mask = _left_padded_batch(seed=12)
    run = jax.jit(lambda model, p: forward(model, p, ids, mask), static_argnums=0)  # traced under the patch
    for dtype, atol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        fused = np.asarray(run(make_model(cfg, dtype=dtype, attention="cudnn"), params))
        plain = np.asarray(run(make_model(cfg, dtype=dtype, attention="einsum"), params))
        assert np.isfinite(fused).all()
        np.testing.assert_allclose(fused[mask], plain[mask], atol=atol)
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
    packed = [np.asarray(make_model(cfg, attention=a).apply({"params": params}, ids[:1], positions, segments > 0,
                                                             segment_ids_BT=segments)[0]) for a in ("cudnn", "einsum")]
    np.testing.assert_allclose(packed[0][0, :9], packed[1][0, :9], atol=1e-5)


def test_pad_queries_stay_finite(llama):
    """A left-pad query sees its own slot, so even an all-pad row has a defined softmax."""
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=13)
    mask[0] = False
    for dtype in ("float32", "bfloat16"):
        assert np.isfinite(np.asarray(jit_forward(make_model(cfg, dtype=dtype), params, ids, mask))).all()


def test_out_of_range_ids_embed_as_id_0(llama):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=14)
    ref = np.asarray(jit_forward(model, params, np.where(mask, ids, 0), mask))
    for pad in (PAD_ID, -cfg.vocab_size - 1, cfg.vocab_size, cfg.vocab_size + 7):
        np.testing.assert_array_equal(np.asarray(jit_forward(model, params, np.where(mask, ids, pad), mask)), ref)


def test_pad_id_is_one_constant():
    assert PAD_ID == -1 and tokenizer.PAD_ID == PAD_ID and SamplingParams(max_new_tokens=1).pad_id == PAD_ID


def test_init_scalar_head_turns_an_lm_into_a_value_model(llama):
    cfg, _, params = llama
    head = init_scalar_head(cfg, jax.random.key(0))
    assert head.shape == (cfg.d_model, 1) and head.dtype == jnp.float32
    assert init_scalar_head(cfg, jax.random.key(0), jnp.bfloat16).dtype == jnp.bfloat16
    # The Transformer declares its `score` param with the same initializer.
    wide = ModelConfig(family="llama", vocab_size=8, d_model=4096, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                       d_ff=8)
    declared = init_params(make_model(wide, head="scalar"), jax.random.key(1))["score"]
    fresh = init_scalar_head(wide, jax.random.key(2))
    assert declared.shape == fresh.shape == (4096, 1)
    np.testing.assert_allclose([np.std(declared), np.std(fresh)], 0.02, rtol=0.05)
    ids, mask = _left_padded_batch(seed=15)
    scalar_params = {**{k: v for k, v in params.items() if k != "lm_head"}, "score": head}
    values = jit_forward(make_model(cfg, head="scalar"), scalar_params, ids, mask)
    assert values.shape == ids.shape and values.dtype == jnp.float32 and np.isfinite(np.asarray(values)).all()


def cudnn_attention_errors(seed: int = 0) -> dict:
    """Max abs logit error over real tokens of the cuDNN and einsum bf16 paths against a float32 HIGHEST
    reference, for a small random Llama (batch 4, T 256, left-padded rows), plus relative gradient errors.
    Needs an NVIDIA GPU; benchmarks/gpu_check.sh prints it as JSON."""
    cfg = ModelConfig(family="llama", vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                      d_ff=512, max_position_embeddings=512)
    params = _scaled_qkv(init_params(make_model(cfg), jax.random.key(seed)), cfg, 5.0)
    rng = np.random.default_rng(seed)
    B, T = 4, 256
    ids = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.arange(T)[None, :] >= np.array([0, 37, 128, 255])[:, None]
    ids = np.where(mask, ids, PAD_ID)

    def run(dtype, attention):
        model = make_model(cfg, dtype=dtype, attention=attention)
        fwd = jax.jit(lambda p: forward(model, p, ids, mask))

        def loss(p):  # mean next-token log-prob over real tokens, as a training step would differentiate
            logp = jax.nn.log_softmax(forward(model, p, ids, mask)[:, :-1], -1)
            picked = jnp.take_along_axis(logp, jnp.maximum(ids[:, 1:], 0)[..., None], -1)[..., 0]
            return jnp.where(mask[:, 1:], picked, 0.0).sum() / mask[:, 1:].sum()

        hlo = fwd.lower(params).as_text() + jax.jit(jax.grad(loss)).lower(params).as_text()
        return np.asarray(fwd(params)), jax.jit(jax.grad(loss))(params), "__cudnn$fmha" in hlo

    ref_logits, ref_grads, _ = run("float32", "einsum")
    ref_norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(ref_grads)))
    out = {"device": jax.devices()[0].device_kind}
    for name, attention in (("cudnn_bf16", "auto"), ("einsum_bf16", "einsum")):
        logits, grads, uses_cudnn = run("bfloat16", attention)
        diff = jax.tree.map(lambda a, b: jnp.sum((a.astype(jnp.float32) - b) ** 2), grads, ref_grads)
        out[name] = dict(max_abs_logit_err=float(np.abs(logits - ref_logits)[mask].max()),
                         logits_finite=bool(np.isfinite(logits).all()),
                         grad_rel_err=float(np.sqrt(sum(float(d) for d in jax.tree.leaves(diff))) / ref_norm),
                         grads_finite=all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)),
                         uses_cudnn=uses_cudnn)
    return out


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_is_as_accurate_as_einsum_bf16():
    errs = cudnn_attention_errors()
    cudnn, einsum = errs["cudnn_bf16"], errs["einsum_bf16"]
    assert cudnn["uses_cudnn"] and not einsum["uses_cudnn"], errs
    assert cudnn["logits_finite"] and cudnn["grads_finite"], errs
    assert cudnn["max_abs_logit_err"] <= 2 * einsum["max_abs_logit_err"] + 1e-4, errs
