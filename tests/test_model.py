"""Numerics of the transformer and sampler against ground truth: transformers' PyTorch models, the uncached
forward pass, unpadded rows, a single device, and a teacher-forced recomputation."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from hf_fixtures import FAMILIES, VOCAB, make_hf_model
from rlhf_jax import hf, sharding
from rlhf_jax.model import KVCache, forward, init_params, make_model, param_logical_axes, positions_from_mask
from rlhf_jax.sampling import SamplingParams, _filter_logits, sample, teacher_forced_logprobs


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
                          position_ids=torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long)).logits
    ours = forward(make_model(cfg), params, ids, mask)
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
    full = np.asarray(forward(model, params, ids, mask))
    prefix = 5  # prefill 5 tokens, then feed the remaining 7 one at a time through the cache
    cache = KVCache.zeros(cfg, ids.shape[0], ids.shape[1])
    key_mask = np.concatenate([mask[:, :prefix], np.zeros_like(mask[:, prefix:])], axis=1)
    positions = np.asarray(positions_from_mask(mask))
    step_logits = []
    logits, cache = model.apply({"params": params}, ids[:, :prefix], positions[:, :prefix], key_mask, cache, 0)
    step_logits.append(np.asarray(logits))
    for t in range(prefix, ids.shape[1]):
        key_mask[:, t] = mask[:, t]
        logits, cache = model.apply({"params": params}, ids[:, t:t + 1], positions[:, t:t + 1], key_mask, cache, t)
        step_logits.append(np.asarray(logits))
    cached = np.concatenate(step_logits, axis=1)
    np.testing.assert_allclose(cached[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_left_padding_does_not_change_logits(request, which):
    cfg, model, params = request.getfixturevalue(which)
    ids, mask = _left_padded_batch(seed=3)
    padded = np.asarray(forward(model, params, ids, mask))
    for row in range(ids.shape[0]):
        real = ids[row][mask[row]][None]
        alone = np.asarray(forward(model, params, real, np.ones_like(real, bool)))[0]
        np.testing.assert_allclose(padded[row][mask[row]], alone, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (4, 1, 2)])
def test_mesh_of_8_equals_one_device(llama, mesh_shape):
    cfg, model, params = llama
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
    tf = teacher_forced_logprobs(model, params, ids, mask, out.tokens_BN, out.mask_BN, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs_BN), np.asarray(tf), atol=1e-5)


def test_eos_truncates_and_masks(llama):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=6)
    eos = tuple(range(3, 40))  # a large EOS set so that every row stops early
    p = SamplingParams(max_new_tokens=16, temperature=1.0, eos_ids=eos, pad_id=-1)
    out = jax.device_get(sample(model, params, ids, mask, jax.random.key(3), p))
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


def test_remat_gives_same_gradients(llama):
    cfg, _, params = llama
    ids, mask = _left_padded_batch(seed=8)

    def loss(model, p):
        return jnp.where(mask, forward(model, p, ids, mask).max(-1), 0.0).sum()

    g_plain = jax.grad(lambda p: loss(make_model(cfg), p))(params)
    g_remat = jax.grad(lambda p: loss(make_model(cfg, remat=True), p))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(llama):
    cfg, model, params = llama
    ids, mask = _left_padded_batch(seed=9)
    f32 = np.asarray(forward(model, params, ids, mask))
    bf16 = np.asarray(forward(make_model(cfg, dtype="bfloat16"), params, ids, mask))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16[mask], f32[mask], atol=5e-2)


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
    cfg, head = hf.config_from_hf(hf_config)
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
    packed, _ = model.apply({"params": params}, ids, positions, segments > 0, segment_ids_BT=segments)
    for tokens, sl in ((a, slice(0, 5)), (b, slice(5, 9))):
        alone = forward(model, params, tokens[None], np.ones((1, len(tokens)), bool))
        np.testing.assert_allclose(np.asarray(packed)[0, sl], np.asarray(alone)[0], atol=1e-5)
