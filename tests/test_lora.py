"""LoRA adapters: a fresh adapter changes nothing; a merge adds (alpha / R) * B @ A to exactly the HF matrix each
target names; the PEFT adapter we write loads with peft on the transformers model and gives our merged export's
logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import VOCAB, make_hf_model
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf, lora
from rlhf_jax.models.hf_weights import params_to_hf
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model

# GQA (2 query heads per KV head), so that a q slice put in the wrong place of the fused qkv shows.
CFG = ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48, eos_token_ids=(1,))
ALL = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.TARGETS)


def _trained(adapters, seed=1):
    """Adapters as after some training: B no longer zero."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_a_fresh_adapter_leaves_every_weight_exactly_as_it_was():
    params = jax.device_get(init_params(make_model(CFG), jax.random.key(0)))
    adapters = lora.init_adapters(CFG, ALL, jax.random.key(1))
    merged = jax.jit(lambda p, a: lora.merge(p, a, CFG, ALL))(params, adapters)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, merged)
    # A as PEFT draws it: kaiming_uniform_(a=sqrt(5)) on its (R, I) weight, uniform in +-sqrt(6 / (6 I)) = 1/sqrt(I)
    for layer in adapters.values():
        for target, ab in layer.items():
            a, bound = np.abs(np.asarray(ab["a_IR"])), 1 / np.sqrt(lora.matrix_shape(CFG, target)[0])
            assert 0.9 * bound < a.max() <= bound and a.mean() == pytest.approx(bound / 2, rel=0.2), target


@pytest.mark.parametrize("targets", [lora.TARGETS, ("q", "v")])
def test_merge_adds_scale_times_b_at_a_to_the_named_hf_matrices_only(targets):
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=targets)
    params = jax.device_get(init_params(make_model(CFG), jax.random.key(0)))
    adapters = _trained(lora.init_adapters(CFG, spec, jax.random.key(1)))
    before, after = params_to_hf(params, CFG), params_to_hf(
        jax.jit(lambda p, a: lora.merge(p, a, CFG, spec))(params, adapters), CFG)
    peft = lora.peft_tensors(adapters, CFG)
    changed = set()
    for i in range(CFG.n_layers):
        for target in targets:
            name = f"model.layers.{i}.{lora.HF_MODULES[target]}"
            A, B = peft[f"base_model.{name.replace('model.', 'model.model.', 1)}.lora_A.weight"], \
                peft[f"base_model.{name.replace('model.', 'model.model.', 1)}.lora_B.weight"]
            assert A.shape == (3, lora.matrix_shape(CFG, target)[0]) and B.shape[1] == 3
            np.testing.assert_allclose(after[name + ".weight"] - before[name + ".weight"], 2.0 * B @ A, atol=1e-6)
            changed.add(name + ".weight")
    for name in set(before) - changed:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _hf_dirs(tmp_path, family: str):
    """(base, adapter, merged) directories: a tiny HF `family` model in base, the other two empty."""
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    for d in (adapter_dir, merged_dir):
        d.mkdir()
    make_hf_model(family, base_dir, seed=2)
    return base_dir, adapter_dir, merged_dir


def _logits(base_dir, adapter_dir, merged_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the base's, peft's with our adapter on the base, our merged export's) logits on the same ids."""
    import peft

    ids = torch.tensor(np.random.default_rng(0).integers(2, VOCAB, (2, 11)))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
        base_logits = base(input_ids=ids).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits.numpy()
        ours = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits.numpy()
    return base_logits, theirs, ours


def test_peft_loads_our_adapter_on_the_transformers_model_with_our_merged_logits(tmp_path):
    base_dir, adapter_dir, merged_dir = _hf_dirs(tmp_path, "llama_gqa_llama3")
    cfg, _, params = hf.load_hf(base_dir)
    spec = lora.LoraSpec(rank=4, alpha=12.0, targets=lora.TARGETS, dropout=0.1)  # alpha / rank other than ALL's 2
    adapters = _trained(lora.init_adapters(cfg, spec, jax.random.key(3)), seed=4)
    lora.write_adapter(adapter_dir, adapters, cfg, spec, base_model=str(base_dir))
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12.0, 0.1)  # PEFT trains on with them
    hf.write_hf(merged_dir, jax.device_get(lora.merge(params, adapters, cfg, spec)), cfg)
    base_logits, theirs, ours = _logits(base_dir, adapter_dir, merged_dir)
    assert np.abs(theirs - base_logits).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


# PEFT's warning for a tied layer in an adapter without ensure_weight_tying
@pytest.mark.filterwarnings("error:Model has `tie_word_embeddings=True`:UserWarning")
def test_a_tied_models_trained_embedding_reaches_its_head_through_peft(tmp_path):
    """PEFT gives a saved embedding to the input alone, untying it from the LM head: the head is saved too, and
    the adapter asks PEFT to keep the two tied (`ensure_weight_tying`), so that it loads without PEFT's warning."""
    from rlhf_jax.models.hf_weights import whole_weights_to_hf

    base_dir, adapter_dir, merged_dir = _hf_dirs(tmp_path, "llama_tied")
    cfg, _, params = hf.load_hf(base_dir)
    assert cfg.tie_embeddings
    spec = lora.LoraSpec(4, 8.0, ALL.targets, also_train=("embed",))
    adapters = _trained(lora.init_adapters(cfg, spec, jax.random.key(3)), seed=4)
    trained = {"embed": params["embed"] + 0.3 * np.random.default_rng(0).standard_normal(params["embed"].shape)}
    saved = whole_weights_to_hf(jax.tree.map(np.float32, trained), cfg)
    lora.write_adapter(adapter_dir, adapters, cfg, spec, base_model=str(base_dir), saved_modules=saved)
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"] and config["ensure_weight_tying"] is True
    hf.write_hf(merged_dir, jax.device_get(lora.merge(lora.join(trained, params), adapters, cfg, spec)), cfg)
    _, theirs, ours = _logits(base_dir, adapter_dir, merged_dir)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_dropout_zeroes_that_share_of_the_adapters_inputs_in_training_only():
    """lora.dropout p: in a training step (a 'dropout' rng) each input of the adapter is zeroed with probability p
    and the rest scaled by 1 / (1 - p); without the rng (evaluation, sampling) the input is whole. With A = B = I
    the adapter's output is its (dropped) input times alpha / rank."""
    import jax.numpy as jnp

    from rlhf_jax.models.layers import LoraDelta

    p, width = 0.25, CFG.n_heads * CFG.head_dim  # the o projection: heads x head_dim in, d_model (as wide) out
    spec = lora.LoraSpec(rank=width, alpha=2.0 * width, targets=("o",), dropout=p)
    delta = LoraDelta(cfg=CFG, spec=spec, target="o")
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (4, 64, width)), jnp.float32)
    params = {"a_IR": jnp.eye(width), "b_RO": jnp.eye(width)}
    whole = np.asarray(delta.apply({"params": params}, x))
    np.testing.assert_allclose(whole, 2.0 * np.asarray(x), rtol=1e-6)
    dropped = np.asarray(delta.apply({"params": params}, x, rngs={"dropout": jax.random.key(1)}))
    zeroed = dropped == 0
    assert abs(zeroed.mean() - p) < 0.02
    np.testing.assert_allclose(dropped[~zeroed], whole[~zeroed] / (1 - p), rtol=1e-6)


def test_bad_specs_and_families_are_one_line_errors():
    with pytest.raises(UserError, match="lora.rank"):
        lora.LoraSpec(rank=0, alpha=1.0, targets=("q",))
    with pytest.raises(UserError, match="lora.targets .*'qkv'"):
        lora.LoraSpec(rank=2, alpha=1.0, targets=("qkv",))
    gpt2 = ModelConfig(family="gpt2", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8,
                       d_ff=64)
    with pytest.raises(UserError, match="not gpt2"):
        lora.init_adapters(gpt2, ALL, jax.random.key(0))


def test_lm_head_in_also_train_is_for_language_models_alone():
    """A reward model has no LM head to train (refused); PPO's value model leaves it to the policy; a tied
    model's head is its embedding (refused, naming embed)."""
    import dataclasses

    from rlhf_jax.config import config_from_dict
    from rlhf_jax.training.state import trained_model

    lora_section = {"rank": 2, "alpha": 4.0, "also_train": ["norms", "lm_head"]}
    with pytest.raises(UserError, match="'lora.also_train' cannot name lm_head for stage rm"):
        config_from_dict({"stage": "rm", "lora": lora_section})
    ppo = config_from_dict({"stage": "ppo", "lora": lora_section})
    assert trained_model(ppo, CFG, "scalar").lora.also_train == ("norms",)
    assert trained_model(ppo, CFG, "lm").lora.also_train == ("norms", "lm_head")
    with pytest.raises(UserError, match="ties its LM head to its embeddings; name embed"):
        trained_model(ppo, dataclasses.replace(CFG, tie_embeddings=True), "lm")
