"""HF interop: both config layouts, EOS lists, exact export/import, transformers loading our exports, errors."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jax

from compile_helpers import jit_forward
from hf_fixtures import FAMILIES, VOCAB, make_hf_model, make_tokenizer
from rlhf_jax.models import hf
from rlhf_jax.models.hf_config import HFFormatError, config_from_hf
from rlhf_jax.models.transformer import init_params, make_model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        make_hf_model(name, path, seed=1)
        out[name] = path
    return out


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=32,
            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_both_rope_layouts_give_the_same_config():
    legacy = {**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}
    v5 = {**BASE, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}
    old_style_type = {**BASE, "rope_theta": 500000.0,
                      "rope_scaling": {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}, "type": "llama3"}}
    a, b, c = (config_from_hf(x)[0] for x in (legacy, v5, old_style_type))
    assert a == b == c
    assert a.rope_type == "llama3" and a.rope_theta == 500000.0 and a.rope_factor == 8.0
    assert a.rope_original_max_position == 16


def test_eos_list_and_generation_config():
    cfg, _ = config_from_hf({**BASE, "eos_token_id": [5, 6]})
    assert cfg.eos_token_ids == (5, 6)
    cfg, _ = config_from_hf({**BASE, "eos_token_id": 5}, generation={"eos_token_id": [5, 7, 8]})
    assert cfg.eos_token_ids == (5, 7, 8)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(HFFormatError) as e:
        config_from_hf({**BASE, "architectures": ["PhiForCausalLM"], "model_type": "phi"})
    msg = str(e.value)
    assert "PhiForCausalLM" in msg and "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg
    assert "Gemma3ForCausalLM" in msg and "MistralForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    assert "\n" not in msg
    with pytest.raises(HFFormatError, match="rope type 'yarn'"):
        config_from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(HFFormatError, match="'architectures' expects a list of class names, got 'LlamaForCausalLM'"):
        config_from_hf({**BASE, "architectures": "LlamaForCausalLM"})


def test_an_eos_id_outside_the_vocabulary_is_refused():
    """The sampler would never draw it, so responses would never end there."""
    with pytest.raises(HFFormatError, match=f"eos_token_id {BASE['vocab_size']} is outside the vocabulary"):
        config_from_hf(BASE, generation={"eos_token_id": [2, BASE["vocab_size"]]})
    assert config_from_hf(BASE, generation={"eos_token_id": [2, BASE["vocab_size"] - 1]})[0].eos_token_ids[1] > 2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_then_import_is_exact(hf_dirs, tmp_path, name):
    cfg, head, params = hf.load_hf(hf_dirs[name])
    hf.save_hf(tmp_path, params, cfg, head, tokenizer_dir=hf_dirs[name])
    cfg2, head2, params2 = hf.load_hf(tmp_path)
    assert (cfg2, head2) == (cfg, head)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    original, exported = load_file(hf_dirs[name] / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for key, value in exported.items():  # every tensor we write is the very tensor transformers wrote
        np.testing.assert_array_equal(value, original[key])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_llama3", "qwen2"])
def test_transformers_loads_our_export(tmp_path, name):
    from rlhf_jax.models.tiny import tiny_config
    import dataclasses

    base = tiny_config(VOCAB, eos_id=1, pad_id=0, family=name.split("_")[0])
    cfg = dataclasses.replace(base, qkv_bias=name == "qwen2", rope_theta=1e6 if name == "qwen2" else 10000.0)
    if name.startswith("llama"):
        cfg = dataclasses.replace(cfg, rope_type="llama3", rope_factor=8.0, rope_original_max_position=32)
    params = jax.device_get(init_params(make_model(cfg), jax.random.key(0)))
    hf.save_hf(tmp_path, params, cfg)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(0).integers(2, VOCAB, (2, 10))
    mask = np.ones_like(ids, bool)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jit_forward(make_model(cfg), params, ids, mask)), ref, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scalar_head_exports_as_sequence_classification(tmp_path, family):
    from rlhf_jax.models.tiny import tiny_config

    cfg = tiny_config(VOCAB, eos_id=1, pad_id=0, family=family)
    model = make_model(cfg, head="scalar")
    params = jax.device_get(init_params(model, jax.random.key(1)))
    hf.save_hf(tmp_path, params, cfg, head="scalar")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch_model.config.num_labels == 1
    ids = np.random.default_rng(0).integers(2, VOCAB, (3, 9))
    ids[1, 6:] = 0  # right-padded with the pad id: transformers reads the last non-pad token
    mask = ids != 0
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits
    values = np.asarray(jit_forward(model, params, ids, mask))
    last = mask.sum(1) - 1
    np.testing.assert_allclose(values[np.arange(3), last], ref.numpy()[:, 0], atol=1e-4)
    cfg2, head2, params2 = hf.load_hf(tmp_path)
    assert head2 == "scalar"
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_index_round_trip(hf_dirs, tmp_path):
    cfg, head, params = hf.load_hf(hf_dirs["llama_gqa_llama3"])
    hf.save_hf(tmp_path, params, cfg, head, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    jax.tree.map(np.testing.assert_array_equal, params, hf.load_hf(tmp_path)[2])


def test_bad_weights_give_clear_errors(hf_dirs, tmp_path):
    src = hf_dirs["llama_gqa_llama3"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match=f"^{tmp_path}: tensor 'model.norm.weight' is missing$"):
        hf.load_hf(tmp_path)  # one line naming the directory
    wrong = {**tensors, "model.norm.weight": np.zeros(7, np.float32)}
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"shape \(7,\), expected \(32,\)"):
        hf.load_hf(tmp_path)
    # a tensor the model does not have (an architecture variant: o_proj with a bias) is refused, not dropped
    extra = {**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"1 tensor\(s\) a llama model of this config does not have, e\.g\. "
                                            r"'model.layers.0.self_attn.o_proj.bias'"):
        hf.load_hf(tmp_path)
    # buffers some files carry load (and are not needed)
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)},
              str(tmp_path / "model.safetensors"))
    hf.load_hf(tmp_path)
    config = json.loads((src / "config.json").read_text())
    for text, message in ((json.dumps([config]), "expected a JSON object, got list"),
                          (json.dumps({k: v for k, v in config.items() if k != "vocab_size"}),
                           "missing key 'vocab_size'"),
                          (json.dumps({**config, "attention_bias": True}), "attention_bias: true is not supported")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(HFFormatError, match=message):
            hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(HFFormatError, match="pickle formats are not loaded"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied"])
def test_original_gpt2_files_without_the_transformer_prefix_load_the_same(hf_dirs, tmp_path, name):
    """OpenAI's GPT-2 files name their tensors without `transformer.` (and carry the causal-mask buffers)."""
    src = hf_dirs[name]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert len(bare) == len(tensors) and not any(k.startswith("transformer.") for k in bare)
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(bare, str(tmp_path / "model.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, hf.load_hf(src)[2], hf.load_hf(tmp_path)[2])


def test_a_tied_checkpoint_that_also_stores_its_lm_head_loads_as_tied(hf_dirs, tmp_path):
    """Some tied checkpoints save the head beside the embedding it equals: it is the embedding, not an extra."""
    src = hf_dirs["llama_tied"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, str(tmp_path / "model.safetensors"))
    cfg, _, params = hf.load_hf(tmp_path)
    assert cfg.tie_embeddings and "lm_head" not in params
    jax.tree.map(np.testing.assert_array_equal, hf.load_hf(src)[2], params)


def test_bfloat16_checkpoint_loads(hf_dirs, tmp_path):
    cfg, head, params = hf.load_hf(hf_dirs["qwen2"])
    hf.save_hf(tmp_path, params, cfg, head, dtype="bfloat16")
    _, _, params_bf16 = hf.load_hf(tmp_path)
    assert jax.tree.leaves(params_bf16)[0].dtype.name == "bfloat16"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b.astype(np.float32), rtol=1e-2, atol=1e-2),
                 params, params_bf16)


def _reward_model(family: str, seed: int = 0):
    """A tiny scalar-head model whose pad id is its EOS id (1), as with Qwen2.5 or pad = eos setups."""
    import dataclasses

    from rlhf_jax.models.tiny import tiny_config

    cfg = dataclasses.replace(tiny_config(VOCAB, eos_id=1, pad_id=1, family=family), qkv_bias=family == "qwen2")
    model = make_model(cfg, head="scalar")
    params = jax.device_get(init_params(model, jax.random.key(seed)))
    params = {**params, "score": params["score"] + 0.5}  # a score far from zero, so a wrong token shows
    return cfg, model, params


def _eos_ending_batch(pad_id: int):
    """(one sequence, a left-padded batch of 2 of different lengths, its mask): real ids end in EOS (1)."""
    rng = np.random.default_rng(0)
    one = np.append(rng.integers(3, 40, 8), 1)[None]
    batch = np.full((2, 9), pad_id)
    batch[0] = one[0]
    batch[1, 3:] = np.append(rng.integers(3, 40, 5), 1)
    mask = np.ones_like(batch, bool)
    mask[1, :3] = False
    return one, batch, mask


def _ours(model, params, ids, mask):
    """rlhf_jax's raw reward: the value at the last real token."""
    from rlhf_jax.training.losses import last_token_values

    return np.asarray(last_token_values(jit_forward(model, params, ids, mask), mask))


def _theirs(out_dir, ids, mask):
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits


# llama: the tokenizer has its own pad token; qwen2: the tokenizer pads with EOS too (Qwen2.5).
@pytest.mark.parametrize("family,pad_is_eos", [("llama", False), ("qwen2", True)])
def test_reward_export_scores_our_last_token_in_transformers(tmp_path, family, pad_is_eos):

    tokenizer = make_tokenizer(tmp_path / "tok", pad_is_eos)
    cfg, model, params = _reward_model(family)
    hf.save_hf(tmp_path / "hf", params, cfg, "scalar", tokenizer_dir=tmp_path / "tok")
    pad = json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"]
    assert pad not in cfg.eos_token_ids and 0 <= pad < VOCAB
    one, batch, mask = _eos_ending_batch(tokenizer.pad_token_id)
    for ids, m in ((one, np.ones_like(one, bool)), (batch, mask)):
        np.testing.assert_allclose(_theirs(tmp_path / "hf", ids, m).numpy()[:, 0], _ours(model, params, ids, m),
                                   atol=1e-4)
    # The exported tokenizer's own batches score right too (it left-pads when it pads with EOS).
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = exported(["w1 w2 w3 w4 <eos>", "w5 w6 <eos>"], padding=True, return_tensors="np")
    ids, m = enc["input_ids"], enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(_theirs(tmp_path / "hf", ids, m).numpy()[:, 0], _ours(model, params, ids, m),
                               atol=1e-4)


def test_a_left_padded_gpt2_reward_export_scores_right_with_the_position_ids_it_names(tmp_path, capsys):
    """GPT-2's absolute positions: transformers numbers them from the first column, so the export says to pass
    position_ids with left-padded batches; with them, its scores are ours."""
    tokenizer = make_tokenizer(tmp_path / "tok", True)
    cfg, model, params = _reward_model("gpt2")
    hf.save_hf(tmp_path / "hf", params, cfg, "scalar", tokenizer_dir=tmp_path / "tok")
    assert "pass position_ids=attention_mask.cumsum(-1) - 1" in capsys.readouterr().err
    _, ids, mask = _eos_ending_batch(tokenizer.pad_token_id)
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    attention = torch.tensor(mask.astype(np.int64))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=attention,
                             position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits.numpy()[:, 0]
    np.testing.assert_allclose(theirs, _ours(model, params, ids, mask), atol=1e-4)


def test_reward_export_without_tokenizer_refuses_batches_in_transformers(tmp_path):
    cfg, model, params = _reward_model("llama")
    hf.save_hf(tmp_path, params, cfg, "scalar")
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] is None  # no id known to be safe
    one, batch, mask = _eos_ending_batch(0)
    np.testing.assert_allclose(_theirs(tmp_path, one, np.ones_like(one, bool)).numpy()[:, 0],
                               _ours(model, params, one, np.ones_like(one, bool)), atol=1e-4)
    with pytest.raises(ValueError, match="no padding token"):
        _theirs(tmp_path, batch, mask)


def test_reward_norm_folds_into_the_hf_export_and_round_trips(tmp_path):
    from rlhf_jax.convert import main as convert
    from rlhf_jax.models.checkpoint import load_model, save_model

    make_tokenizer(tmp_path / "tok", pad_is_eos=True)
    cfg, model, params = _reward_model("qwen2", seed=1)
    norm = {"gain": 2.0, "bias": -0.5, "reference_responses": 8}
    save_model(tmp_path / "ckpt", params, cfg, "scalar", tokenizer_dir=tmp_path / "tok", extra={"reward_norm": norm})
    assert convert(["--to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    one, batch, mask = _eos_ending_batch(1)
    expected = norm["gain"] * _ours(model, params, batch, mask) + norm["bias"]
    # docs/stages/rm.md's rule: normalised reward = logits[:, 0] + config.reward_norm["bias"].
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    logits = _theirs(tmp_path / "hf", batch, mask).numpy()[:, 0]
    np.testing.assert_allclose(logits + hf_config.reward_norm["bias"], expected, atol=1e-4)
    assert hf_config.reward_norm == {**norm, "gain": 1.0, "folded_gain": 2.0}
    # Back in rlhf_jax (directly, and converted to a checkpoint): gain * raw + bias is unchanged.
    assert convert(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    for loaded in (load_model(tmp_path / "hf"), load_model(tmp_path / "back")):
        rn = loaded.extra["reward_norm"]
        raw = _ours(make_model(loaded.cfg, head="scalar"), loaded.params, batch, mask)
        np.testing.assert_allclose(rn["gain"] * raw + rn["bias"], expected, atol=1e-4)
