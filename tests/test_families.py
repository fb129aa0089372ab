"""Qwen3, Mistral, Gemma 2 and Gemma 3 text: how config.json reads (transformers' defaults, derived layer types,
refused settings), sliding windows in every path (against a brute-force rule, the full pass, the KV cache, left
padding, cuDNN's mask), Gemma's embedding normalizer, and exports that transformers loads with the same logits
and scores. Logits and greedy generation against transformers' own models: tests/test_model.py (FAMILIES)."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import flax.linen as nn
import jax
import jax.numpy as jnp

from compile_helpers import jit_forward
from hf_fixtures import VOCAB
from rlhf_jax.models import hf
from rlhf_jax.models.architecture import FULL, SLIDING, ModelConfig
from rlhf_jax.models.hf_config import HFFormatError, config_from_hf, config_to_hf
from rlhf_jax.models.layers import _use_cudnn_attention
from rlhf_jax.models.transformer import Block, KVCache, forward, init_params, make_model, positions_from_mask

NEW_FAMILIES = ["qwen3", "mistral", "gemma2", "gemma3"]
WINDOW = 4


def tiny(family: str, **changes) -> ModelConfig:
    """A tiny model of the family with every variation it has switched on: a window of 4 slots, layers mixing
    sliding and full attention, local and global RoPE, soft-caps that bend its small scores and logits."""
    base = dict(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                d_ff=48, max_position_embeddings=128, bos_token_id=3, eos_token_ids=(1,), pad_token_id=0,
                sliding_window=WINDOW)
    per_family = {
        "qwen3": dict(rope_theta=1e6, tie_embeddings=True, layer_types=(FULL, SLIDING)),
        "mistral": dict(),
        "gemma2": dict(tie_embeddings=True, layer_types=(SLIDING, FULL), query_pre_attn_scalar=24.0,
                       attn_softcap=0.1, final_softcap=0.5),
        "gemma3": dict(tie_embeddings=True, n_layers=3, layer_types=(SLIDING, FULL, SLIDING), rope_theta=1e6,
                       rope_type="linear", rope_factor=4.0, rope_local_theta=100.0, query_pre_attn_scalar=20.0),
    }
    return ModelConfig(**{**base, **per_family[family], **changes})


def random_params(cfg: ModelConfig, head: str = "lm", seed: int = 0) -> dict:
    """Random weights with every tensor perturbed (norm scales too), so that each one matters."""
    params = jax.device_get(init_params(make_model(cfg, head=head), jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)


def _left_padded_batch(seed=0, batch=4, width=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, width)).astype(np.int32)
    mask = np.ones((batch, width), bool)
    for row, pad in enumerate([0, 3, 7, 10][:batch]):
        mask[row, :pad] = False
    return np.where(mask, ids, 0), mask


# ------------------------------------------------------------------------------------------------ config.json


GEMMA3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32,
              intermediate_size=48, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_layer_types_are_derived_as_transformers_derives_them():
    """Without `layer_types`: Gemma 3 makes every pattern-th layer global, Gemma 2 its odd layers, Qwen3 slides
    from max_window_layers on; Mistral slides everywhere; no window means no sliding layer."""
    cfg, _ = config_from_hf({**GEMMA3, "sliding_window": 5, "sliding_window_pattern": 3})
    assert [cfg.is_sliding(i) for i in range(7)] == [(i + 1) % 3 != 0 for i in range(7)]
    assert cfg.sliding_window == 5
    gemma2 = {**GEMMA3, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
    cfg, _ = config_from_hf(gemma2)
    assert [cfg.is_sliding(i) for i in range(7)] == [i % 2 == 0 for i in range(7)] and cfg.sliding_window == 4096
    qwen3 = {**GEMMA3, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": True,
             "sliding_window": 8, "max_window_layers": 5}
    cfg, _ = config_from_hf(qwen3)
    assert [cfg.is_sliding(i) for i in range(7)] == [i >= 5 for i in range(7)]
    cfg, _ = config_from_hf({**qwen3, "use_sliding_window": False})  # the window holds only with the flag
    assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(7))
    mistral = {**GEMMA3, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": None}
    cfg, _ = config_from_hf({**mistral, "layer_types": [FULL] * 7})  # transformers' Mistral ignores layer_types
    assert all(cfg.is_sliding(i) for i in range(7)) and cfg.sliding_window == 4096 and cfg.head_dim == 8
    cfg, _ = config_from_hf({**mistral, "sliding_window": None})
    assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(7))


def test_missing_keys_take_the_families_defaults_and_both_rope_layouts_agree():
    gemma2, _ = config_from_hf({**GEMMA3, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"})
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
    assert gemma2.tie_embeddings and gemma2.rope_theta == 10000.0
    # transformers' Gemma 3 attention never soft-caps, whatever attn_logit_softcapping says
    gemma3, _ = config_from_hf({**GEMMA3, "attn_logit_softcapping": 50.0})
    assert gemma3.attn_softcap is None and gemma3.final_softcap is None
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1_000_000.0, 10000.0)
    legacy = {**GEMMA3, "rope_theta": 1e6, "rope_local_base_freq": 100.0,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    v5 = {**GEMMA3, "rope_parameters": {FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        SLIDING: {"rope_type": "default", "rope_theta": 100.0}}}
    a, b = config_from_hf(legacy)[0], config_from_hf(v5)[0]
    assert a == b and (a.rope_type, a.rope_factor, a.rope_local_theta) == ("linear", 8.0, 100.0)
    qwen3, _ = config_from_hf({**GEMMA3, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                               "head_dim": None})
    assert qwen3.head_dim == 128 and qwen3.qk_norm and not qwen3.qkv_bias and not qwen3.tie_embeddings


@pytest.mark.parametrize("model_type, architecture, config_class", [
    ("llama", "LlamaForCausalLM", "LlamaConfig"), ("qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    ("qwen3", "Qwen3ForCausalLM", "Qwen3Config"), ("mistral", "MistralForCausalLM", "MistralConfig"),
    ("gemma2", "Gemma2ForCausalLM", "Gemma2Config"), ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig"),
    ("gpt2", "GPT2LMHeadModel", "GPT2Config")])
def test_keys_a_config_leaves_out_read_as_transformers_reads_them(model_type, architecture, config_class):
    """A config.json with the sizes only: every default we take is transformers' own for that family."""
    if model_type == "gpt2":
        sizes = {"vocab_size": 64, "n_embd": 32, "n_layer": 7, "n_head": 4, "n_positions": 64}
    else:
        sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 7, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 48}
    ours, _ = config_from_hf({**sizes, "architectures": [architecture], "model_type": model_type})
    theirs = getattr(transformers, config_class)(**sizes)
    if model_type == "gpt2":
        assert (ours.norm_eps, ours.tie_embeddings, ours.d_ff) == (theirs.layer_norm_epsilon,
                                                                   theirs.tie_word_embeddings, 4 * theirs.n_embd)
        return
    rope = theirs.rope_parameters.get(FULL, theirs.rope_parameters)
    # without layer_types (llama, mistral), a window holds in every layer
    layer_types = getattr(theirs, "layer_types", None) or [SLIDING if getattr(theirs, "sliding_window", None)
                                                           else FULL] * 7
    assert ours.norm_eps == theirs.rms_norm_eps and ours.tie_embeddings == theirs.tie_word_embeddings
    assert ours.max_position_embeddings == theirs.max_position_embeddings and ours.rope_theta == rope["rope_theta"]
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 32 // 4)
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    assert [SLIDING if ours.is_sliding(i) else FULL for i in range(7)] == list(layer_types)


def test_rope_parameters_win_over_a_top_level_rope_theta_as_in_transformers():
    sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "rope_theta": 5e5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    ours, _ = config_from_hf({**sizes, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert ours.rope_theta == transformers.LlamaConfig(**sizes).rope_parameters["rope_theta"] == 1e4


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(attention_bias=True), "attention_bias: true is not supported for gemma3"),
    (dict(layer_types=[SLIDING] * 3), "layer_types must list 7 entries"),
    (dict(rope_parameters={SLIDING: {"rope_type": "linear", "factor": 2.0}}), "sliding layers' rope type 'linear'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}),
     "Gemma 3's rope_parameters must be given per layer type"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True),
     "sliding-window attention is not supported for qwen2"),
    (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"),
     "architecture 'Gemma3ForConditionalGeneration' is not supported"),
    # transformers builds a Mistral (sliding window) where the architecture says Llama (none): one must be wrong
    (dict(architectures=["LlamaForCausalLM"], model_type="mistral"),
     r"architectures names 'LlamaForCausalLM' \(llama\) but model_type is 'mistral' \(mistral\); one of them is wrong"),
    (dict(num_attention_heads=3), r"invalid value for a gemma3 model \(n_heads=3 is not a multiple"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(num_hidden_layers="2"), "num_hidden_layers must be a positive integer, got '2'"),
    (dict(sliding_window_pattern=0), "sliding_window_pattern must be a positive integer, got 0"),
    (dict(eos_token_id="</s>"), r"invalid value for a gemma3 model \(invalid literal for int"),
    (dict(rms_norm_eps=None), r"invalid value for a gemma3 model \(float\(\) argument"),  # transformers refuses it too
    (dict(rope_parameters="default"), "invalid value for a gemma3 model"),
    # transformers reads rope_scaling and drops rope_parameters: a config whose two layouts differ is ambiguous
    (dict(rope_parameters={FULL: {"rope_type": "default", "rope_theta": 500.0}},
          rope_scaling={"rope_type": "linear", "factor": 4.0}), r"rope_scaling and rope_parameters disagree \(rope_"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    # every unsupported setting at once, so that one edit fixes them all
    (dict(hidden_activation="relu", attention_bias=True, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     r"hidden_activation 'relu' is not supported \(expected gelu_pytorch_tanh\); attention_bias: true is not "
     r"supported for gemma3; rope type 'yarn' is not supported"),
])
def test_unsupported_settings_are_refused_in_one_line(changes, match):
    with pytest.raises(HFFormatError, match=match) as e:
        config_from_hf({**GEMMA3, **changes}, where="m/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("m/config.json")
    assert str(e.value).count("config.json") == 1


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_exported_config_reads_back_the_same_and_as_transformers_class(tmp_path, family):
    """config_to_hf -> config_from_hf is the identity, and transformers reads the same windows, layer types,
    RoPE bases and caps from it (the logits that follow: test_transformers_loads_our_export)."""
    for cfg in (tiny(family), tiny(family, sliding_window=None, layer_types=())):
        for head in ("lm", "scalar"):
            assert config_from_hf(config_to_hf(cfg, head)) == (cfg, head)
    cfg = tiny(family)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == {"qwen3": "Qwen3Config", "mistral": "MistralConfig",
                                     "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[family]
    assert theirs.sliding_window == WINDOW and theirs.head_dim == cfg.head_dim
    if family != "mistral":
        assert [t == SLIDING for t in theirs.layer_types] == [cfg.is_sliding(i) for i in range(cfg.n_layers)]
    if family == "gemma2":
        assert (theirs.attn_logit_softcapping, theirs.final_logit_softcapping) == (0.1, 0.5)
        assert theirs.query_pre_attn_scalar == 24
    if family == "gemma3":
        assert theirs.rope_parameters[SLIDING] == {"rope_type": "default", "rope_theta": 100.0}
        assert theirs.rope_parameters[FULL]["rope_type"] == "linear" and theirs.rope_parameters[FULL]["factor"] == 4
        # what readers before rope_parameters take the sliding layers' base from
        assert json.loads((tmp_path / "config.json").read_text())["rope_local_base_freq"] == 100.0


def test_model_json_keeps_the_new_fields_and_older_files_read_as_before():
    """A checkpoint's model.json stores the config as JSON (tuples become lists): it reads back equal and
    hashable; a model.json written before these fields existed reads with the defaults, unchanged."""
    from rlhf_jax.models.checkpoint import model_config_from_json, model_config_to_json

    cfg = dataclasses.replace(tiny("gemma3"), eos_token_ids=(1, 2))
    back = model_config_from_json(json.loads(json.dumps(model_config_to_json(cfg))))
    assert back == cfg and hash(back) == hash(cfg) and back.layer_types == (SLIDING, FULL, SLIDING)
    assert back.eos_token_ids == (1, 2)  # where sampling stops
    llama = ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, d_ff=48)
    new_fields = ("sliding_window", "layer_types", "rope_local_theta", "query_pre_attn_scalar", "attn_softcap",
                  "final_softcap")
    older = {k: v for k, v in model_config_to_json(llama).items() if k not in new_fields}
    assert model_config_from_json(older) == llama and not any(llama.is_sliding(i) for i in range(2))
    gemma3 = {k: v for k, v in model_config_to_json(tiny("gemma3")).items() if k != "rope_local_theta"}
    assert model_config_from_json(gemma3).rope_local_theta == 10000.0  # transformers' rope_local_base_freq
    with pytest.raises(ValueError, match="sliding_window=0 must be at least 1"):
        dataclasses.replace(tiny("mistral"), sliding_window=0)


# ------------------------------------------------------------------------------------------------ sliding windows


@pytest.mark.parametrize("family,layer_type", [("mistral", SLIDING), ("gemma3", SLIDING), ("gemma3", FULL)])
def test_a_token_sees_exactly_the_keys_its_layer_allows(family, layer_type):
    """One layer: the logits at query i change when token j changes iff j <= i and, on a sliding layer,
    i - j < window; each (i, j) pair checked against that rule."""
    cfg = tiny(family, n_layers=1, layer_types=(layer_type,) if family != "mistral" else ())
    model, params = make_model(cfg), random_params(cfg)
    T = 10
    ids = np.random.default_rng(1).integers(3, VOCAB, (1, T)).astype(np.int32)
    variants = np.repeat(ids, T + 1, axis=0)
    for j in range(T):
        variants[j + 1, j] = 3 + (ids[0, j] - 3 + 17) % (VOCAB - 3)  # row j + 1: token j replaced
    logits = np.asarray(jax.jit(forward, static_argnums=0)(model, params, variants, np.ones_like(variants, bool)))
    changed = np.abs(logits[1:] - logits[:1]).max(-1) > 1e-6  # [j, i]: did changing token j move query i
    sliding = layer_type == SLIDING
    expected = np.array([[j <= i and (not sliding or i - j < WINDOW) for i in range(T)] for j in range(T)])
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("family", ["gemma3", "mistral", "gemma2", "qwen3"])
def test_cached_decode_and_left_padding_equal_the_full_pass_past_the_window(family):
    """Prefill 7 slots (beyond the window of 4), decode the other 5 one by one through the KV cache: the logits
    are the full pass's; and each left-padded row's logits are those of the row alone, unpadded."""
    cfg = tiny(family)
    model, params = make_model(cfg), random_params(cfg)
    ids, mask = _left_padded_batch(seed=2)
    full_pass = jax.jit(lambda p, i, m: forward(model, p, i, m))
    cached_pass = jax.jit(lambda p, *args: model.apply({"params": p}, *args))  # one program per query length
    full = np.asarray(full_pass(params, ids, mask))
    prefix = 7
    cache = KVCache.zeros(cfg, ids.shape[0], ids.shape[1])
    key_mask = np.concatenate([mask[:, :prefix], np.zeros_like(mask[:, prefix:])], axis=1)
    positions = np.asarray(positions_from_mask(mask))
    logits, cache = cached_pass(params, ids[:, :prefix], positions[:, :prefix], key_mask, cache, 0)
    steps = [np.asarray(logits)]
    for t in range(prefix, ids.shape[1]):
        key_mask[:, t] = mask[:, t]
        logits, cache = cached_pass(params, ids[:, t:t + 1], positions[:, t:t + 1], key_mask, cache, t)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask], full[mask], atol=1e-5)
    # row 1: 9 real tokens after 3 pads, more than the window
    alone = np.asarray(full_pass(params, ids[1:2, 3:], mask[1:2, 3:]))[0]
    np.testing.assert_allclose(full[1][mask[1]], alone, atol=1e-5)


def test_fused_attention_carries_the_window_and_soft_capping_keeps_the_einsum(monkeypatch):
    """The window goes into the fused call's mask (XLA's implementation standing in for cuDNN); soft-capped
    scores, which that call cannot express, always take the einsum."""
    assert not _use_cudnn_attention("cudnn", jnp.bfloat16, True, 12, 16, softcapped=True)
    assert _use_cudnn_attention("cudnn", jnp.bfloat16, True, 12, 16, softcapped=False)
    from rlhf_jax.models import layers

    with monkeypatch.context() as m:  # 'auto' where cuDNN is there: bf16 full passes within cuDNN's shape limits
        m.setattr(layers, "_cudnn_attention_available", lambda: True)
        auto = lambda dtype, T, H, full_pass=True: _use_cudnn_attention("auto", dtype, full_pass, T, H)
        assert auto(jnp.bfloat16, 8, 128) and auto(jnp.bfloat16, 12, 64)
        assert not any([auto(jnp.bfloat16, 7, 64), auto(jnp.bfloat16, 8, 136), auto(jnp.bfloat16, 8, 12),
                        auto(jnp.float32, 8, 64), auto(jnp.bfloat16, 8, 64, full_pass=False)])
    real = jax.nn.dot_product_attention
    calls = []

    def xla(*a, implementation=None, **kw):
        calls.append(implementation)
        return real(*a, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla)
    ids, mask = _left_padded_batch(seed=3)
    cfg = tiny("gemma3")
    params = random_params(cfg)
    run = jax.jit(forward, static_argnums=0)
    fused = np.asarray(run(make_model(cfg, attention="cudnn"), params, ids, mask))
    plain = np.asarray(run(make_model(cfg, attention="einsum"), params, ids, mask))
    assert calls == ["cudnn"] * cfg.n_layers
    np.testing.assert_allclose(fused[mask], plain[mask], atol=1e-5)
    calls.clear()
    gemma2 = make_model(tiny("gemma2"), attention="cudnn")
    jax.eval_shape(lambda p: forward(gemma2, p, ids, mask), random_params(tiny("gemma2")))
    assert calls == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma_embeddings_are_scaled_by_the_normalizer_in_the_compute_dtype(dtype):
    """The first layer reads embed * sqrt(d_model) with the normalizer rounded to the compute dtype, as
    transformers does (sqrt(48) = 6.93 is 6.9375 in bfloat16)."""
    cfg = tiny("gemma3", d_model=48, n_layers=1, layer_types=(SLIDING,))
    params = random_params(cfg)
    ids, mask = _left_padded_batch(seed=4)

    def block_input(p):
        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, Block) and context.method_name == "__call__":
                seen.append(args[0][0])  # carry = (x_BTD, cache)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            forward(make_model(cfg, dtype=dtype), p, ids, mask)
        return seen[0]

    as_dtype = lambda x: np.asarray(x, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    expected = as_dtype(np.asarray(params["embed"])[ids]) * as_dtype(np.sqrt(48.0))
    np.testing.assert_array_equal(np.asarray(jax.jit(block_input)(params)), expected)


# ------------------------------------------------------------------------------------------------ exports


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_transformers_loads_our_export(tmp_path, family):
    cfg = tiny(family)
    params = random_params(cfg)
    hf.save_hf(tmp_path, params, cfg)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(torch_model).__name__ == config_to_hf(cfg)["architectures"][0]
    ids, mask = _left_padded_batch(seed=5)
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(int)),
                          position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jit_forward(make_model(cfg), params, ids, mask))[mask], ref[mask], atol=1e-4)
    cfg2, head2, params2 = hf.load_hf(tmp_path)
    assert (cfg2, head2) == (cfg, "lm")
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_sequence_classification_export_scores_like_transformers(tmp_path, family):
    """A scalar head exports as the family's *ForSequenceClassification; transformers scores the last real
    token of rows longer than the window (right-padded) as we do, and the export reads back exactly."""
    cfg = tiny(family)
    model = make_model(cfg, head="scalar")
    params = random_params(cfg, head="scalar", seed=1)
    hf.save_hf(tmp_path, params, cfg, head="scalar")
    architecture = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    assert architecture == {"qwen3": "Qwen3ForSequenceClassification", "mistral": "MistralForSequenceClassification",
                            "gemma2": "Gemma2ForSequenceClassification",
                            "gemma3": "Gemma3TextForSequenceClassification"}[family]
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(torch_model).__name__ == architecture and torch_model.config.num_labels == 1
    ids = np.random.default_rng(6).integers(2, VOCAB, (3, 11))
    ids[1, 7:] = 0  # right-padded with the pad id: transformers reads the last non-pad token
    mask = ids != 0
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits
    values = np.asarray(jit_forward(model, params, ids, mask))
    np.testing.assert_allclose(values[np.arange(3), mask.sum(1) - 1], ref.numpy()[:, 0], atol=1e-4)
    cfg2, head2, params2 = hf.load_hf(tmp_path)
    assert head2 == "scalar" and cfg2 == dataclasses.replace(cfg, pad_token_id=cfg2.pad_token_id)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_a_gemma_config_without_its_attention_scalar_exports_the_head_dims_scale():
    """query_pre_attn_scalar None means 1/sqrt(head_dim): exported as head_dim, never as null (unloadable)."""
    cfg = dataclasses.replace(tiny("gemma3"), query_pre_attn_scalar=None)
    exported = config_to_hf(cfg)
    assert exported["query_pre_attn_scalar"] == cfg.head_dim
    assert config_from_hf(exported)[0] == dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.head_dim))


@pytest.mark.full  # each path alone is in the fast tier (tests/test_sampling_exit.py)
@pytest.mark.parametrize("family, scan, dtype, tolerance", [("gemma2", False, "float32", 1e-5),
                                                            ("gemma3", True, "float32", 1e-5),
                                                            ("mistral", False, "bfloat16", 5e-3)])
def test_the_sampler_with_windows_segments_and_shared_prompts_draws_what_teacher_forcing_scores(
        monkeypatch, family, scan, dtype, tolerance):
    """Every sampler path at once over a window of 4 slots: 20 new tokens as one decode loop with a row per
    prompt, and as four loops over a growing cache with each prompt's prefill shared by 2 rows, draw the same
    tokens; their log-probs are what a teacher-forced pass gives at the temperature (bfloat16: to its rounding)."""
    from rlhf_jax.models import sampling
    from rlhf_jax.models.transformer import params_for

    cfg = tiny(family)
    model = make_model(cfg, scan_layers=scan, dtype=dtype)
    params = params_for(model, random_params(cfg))
    G, N = 2, 20
    ids, mask = _left_padded_batch(batch=3, width=9)
    ids, mask = np.repeat(ids, G, 0), np.repeat(mask, G, 0)
    p = sampling.SamplingParams(max_new_tokens=N, temperature=0.8, top_k=20, top_p=0.9, pad_id=0)
    run = lambda group: jax.device_get(jax.jit(lambda pr: sampling.sample(model, pr, ids, mask, jax.random.key(1), p,
                                                                          group))(params))
    one = run(1)
    monkeypatch.setattr(sampling, "DECODE_SEGMENT_MIN", 4)
    assert sampling.decode_segments(N - 1) == [5, 10, 15, 19]
    segmented = run(G)
    np.testing.assert_array_equal(segmented.tokens_BN, one.tokens_BN)
    np.testing.assert_allclose(segmented.logprobs_BN, one.logprobs_BN, atol=tolerance)
    forced = jax.jit(lambda pr: sampling.teacher_forced_logprobs(model, pr, ids, mask, one.tokens_BN, one.mask_BN,
                                                                 p.temperature))(params)
    real = np.asarray(one.mask_BN, bool)
    assert real.sum() > 3 * N  # responses long enough to run past the window
    np.testing.assert_allclose(one.logprobs_BN[real], np.asarray(forced)[real], atol=tolerance)
