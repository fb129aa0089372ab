"""A dry run of the reference pipelines (configs/tldr_gpt2.yaml, configs/hh_qwen2.5_0.5b.yaml,
configs/hh_qwen3_0.6b.yaml, configs/tldr_gemma3_1b.yaml), which need network and accelerators to run for real:
every step validates and fits together, the real architectures have their published parameter counts, and every
training step (sft, rm, ppo) compiles on the 8-device CPU mesh with the step's own batch sizes, sequence lengths,
optimizer, accumulation and PPO settings, on a tiny stand-in model of the same family, built by rlhf_jax/plan/ as
--dry-run builds them. Inputs are abstract (jax.ShapeDtypeStruct with
shardings): nothing is downloaded, nothing large is allocated and nothing runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import pipeline
from rlhf_jax.data import formats
from rlhf_jax.data.formats import hh_rlhf, tldr
from rlhf_jax.models.architecture import FULL, SLIDING
from rlhf_jax.models.hf_config import config_from_hf
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model
from rlhf_jax.plan.figures import compile_program
from rlhf_jax.plan.programs import ppo_iteration_program, train_step_program
from rlhf_jax.runtime import sharding
from rlhf_jax.training import state as training_state

CONFIGS = Path(__file__).parent.parent / "configs"

# The real architectures, as our config_from_hf reads their published config.json.
GPT2_124M = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        head_dim=64, d_ff=3072, max_position_embeddings=1024, norm_eps=1e-5, tie_embeddings=True,
                        bos_token_id=50256, eos_token_ids=(50256,))
QWEN25_05B = ModelConfig(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=64, d_ff=4864, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
                         qkv_bias=True, tie_embeddings=True, bos_token_id=151643, eos_token_ids=(151643,))
QWEN3_06B = ModelConfig(family="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                        head_dim=128, d_ff=3072, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
                        tie_embeddings=True, bos_token_id=151643, eos_token_ids=(151643,))
# Gemma 3: every 6th layer global, the others slide over 512 tokens with their own RoPE base.
GEMMA3_1B = ModelConfig(family="gemma3", vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                        head_dim=256, d_ff=6912, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
                        tie_embeddings=True, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0, sliding_window=512,
                        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(26)),
                        rope_local_theta=10000.0, query_pre_attn_scalar=256.0)
# The fields of their config.json that matter to us (openai-community/gpt2, Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B-Base,
# google/gemma-3-1b-pt).
HF_CONFIGS = {
    "tldr_gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12,
                      n_head=12, n_positions=1024, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                      bos_token_id=50256, eos_token_id=50256),
    "hh_qwen2.5_0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True,
                            use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
    "hh_qwen3_0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                          intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                          head_dim=128, max_position_embeddings=32768, max_window_layers=28, rms_norm_eps=1e-6,
                          rope_theta=1000000, rope_scaling=None, hidden_act="silu", attention_bias=False,
                          tie_word_embeddings=True, sliding_window=None, use_sliding_window=False,
                          bos_token_id=151643, eos_token_id=151643),
    "tldr_gemma3_1b": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144,
                           hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
                           hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rope_theta=1000000,
                           rope_local_base_freq=10000, rope_scaling=None, sliding_window=512,
                           sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None,
                           attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
# Tiny stand-ins: the same family, flags and position table; one small layer (compile time grows with layers).
TINY = dict(vocab_size=128, d_model=32, n_layers=1, head_dim=8, d_ff=64, eos_token_ids=(1,))

REFERENCES = {
    # name: (real architecture, its exact parameter count, the tiny stand-in, its base model dir)
    "tldr_gpt2": (GPT2_124M, 124_439_808, dataclasses.replace(GPT2_124M, n_heads=4, n_kv_heads=4, **TINY),
                  "models/gpt2"),
    "hh_qwen2.5_0.5b": (QWEN25_05B, 494_032_768, dataclasses.replace(QWEN25_05B, n_heads=4, n_kv_heads=2, **TINY),
                        "models/qwen2.5-0.5b"),
    "hh_qwen3_0.6b": (QWEN3_06B, 596_049_920, dataclasses.replace(QWEN3_06B, n_heads=4, n_kv_heads=2, **TINY),
                      "models/qwen3-0.6b-base"),
    # the stand-in's one layer slides (512 tokens, shorter than TL;DR's sequences)
    "tldr_gemma3_1b": (GEMMA3_1B, 999_885_952, dataclasses.replace(GEMMA3_1B, n_heads=4, n_kv_heads=1,
                                                                   layer_types=(SLIDING,), **TINY),
                       "models/gemma-3-1b-pt"),
}
URLS = {"tldr_sft": [tldr.TLDR_SFT_URLS["train"]], "tldr_prompts": [tldr.TLDR_SFT_URLS["train"]],
        "tldr_comparisons": [tldr.TLDR_COMPARISONS_URL.format(n=n) for n in tldr.TLDR_COMPARISONS_BATCHES],
        **{fmt: [hh_rlhf.HH_RLHF_URLS["helpful-base/train"]] for fmt in ("hh_rlhf", "hh_rlhf_sft", "hh_rlhf_prompts")}}
STAND_IN_EXAMPLES = 10_000  # train.epochs needs the dataset's size, only for the schedule's length
STAND_IN_RESPONSES = 4  # ranking slots per prompt (at run time: the prepared dataset's largest K)


def _steps(name: str) -> dict[str, pipeline.Step]:
    run_dir, loaded = pipeline.load(str(CONFIGS / f"{name}.yaml"))
    assert run_dir == Path("runs") / name
    return {step.name: step for step in loaded}


def _stage(name: str, stage: str):
    [step] = [s for s in _steps(name).values() if s.cfg.stage == stage]
    return step.cfg


# ----------------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_step_validates_and_the_steps_fit_together(name):
    steps_by_name = _steps(name)
    stages = [s.cfg.stage for s in steps_by_name.values()]
    assert stages == ["prepare"] * 3 + ["sft", "rm", "ppo", "eval"]
    real, _, _, base = REFERENCES[name]
    prepared = {}  # dataset name -> kind
    for step in steps_by_name.values():
        cfg = step.cfg
        assert cfg.run_dir == f"runs/{name}/{step.name}" and cfg.data.dir == f"runs/{name}/data"
        assert cfg.model.dtype == "bfloat16" and cfg.mesh.axes[:2] == ("data", "fsdp") and -1 in cfg.mesh.shape[:2]
        if cfg.stage == "prepare":
            p = cfg.prepare
            assert list(p.inputs) == URLS[p.format] and p.eval_fraction == 0.05  # one hash split for every dataset
            prepared[p.name] = formats.FORMATS[p.format]
    assert sorted(prepared.values()) == ["prompts", "rankings", "sft"]

    sft, rm, ppo_cfg, ev = (_stage(name, s) for s in ("sft", "rm", "ppo", "eval"))
    run = f"runs/{name}"
    assert sft.model.path == base and rm.model.path == ppo_cfg.model.path == f"{run}/sft/export"
    assert (prepared[sft.data.name], prepared[rm.data.name], prepared[ppo_cfg.data.name]) == ("sft", "rankings",
                                                                                            "prompts")
    assert ppo_cfg.ppo.reward_model == ev.eval.reward_model == f"{run}/rm/export"
    assert rm.rm.reference_dataset in prepared and prepared[rm.rm.reference_dataset] == "sft"
    assert ev.eval.reference == f"{run}/sft/export" and f"{run}/ppo/export" in ev.eval.policies
    assert ev.eval.prompts == f"{run}/data/{ppo_cfg.data.name}:eval"
    assert ev.eval.rankings == f"{run}/data/{rm.data.name}:eval" and not ev.eval.gold
    assert ppo_cfg.ppo.ptx_coef == 0  # the compile test below passes no pretraining batch
    for cfg in (sft, rm, ppo_cfg, ev):
        assert cfg.train.batch_size % 8 == 0 and cfg.sampling.batch_size % 8 == 0
        assert cfg.sampling.max_prompt_tokens == cfg.data.max_prompt_tokens
    # Sequences fit the real model's positions, as the stages check before training.
    training_state.check_positions(real, sft.data.max_prompt_tokens + sft.data.max_response_tokens, "sft")
    training_state.check_positions(real, ppo_cfg.data.max_prompt_tokens + ppo_cfg.sampling.max_new_tokens, "ppo")


@pytest.mark.parametrize("name", list(REFERENCES))
def test_real_architecture_has_its_published_parameter_count(name):
    real, n_params, _, _ = REFERENCES[name]
    assert config_from_hf(HF_CONFIGS[name]) == (real, "lm")
    shapes = jax.eval_shape(lambda: init_params(make_model(real, dtype="bfloat16"), jax.random.key(0)))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == n_params


# ----------------------------------------------------------------------------------------------------- compiling


def _compile(cfg, tiny: ModelConfig):
    """The stage's program as its stage builds and jits it (rlhf_jax/plan/, what --dry-run compiles), on
    abstract inputs, compiled for the step's mesh."""
    mesh = sharding.mesh_from_config(cfg.mesh)
    total = cfg.train.steps or training_state.total_steps(cfg, STAND_IN_EXAMPLES)
    if cfg.stage == "ppo":
        lowered = ppo_iteration_program(cfg, tiny, mesh, total_steps=total)
    else:
        lowered = train_step_program(cfg, tiny, mesh, STAND_IN_RESPONSES, total_steps=total)
    return compile_program(lowered, mesh)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_training_step_compiles_at_the_configs_sizes(name, stage):
    cfg, tiny = _stage(name, stage), REFERENCES[name][2]
    compiled = _compile(cfg, tiny)
    state_out, metrics_out = compiled.output_shardings
    assert all(s.mesh.devices.size == 8 for s in jax.tree.leaves(state_out))
    assert np.all([m.is_fully_replicated for m in jax.tree.leaves(metrics_out)])
