"""A dry run of the reference pipelines (configs/tldr_gpt2.yaml, configs/hh_qwen2.5_0.5b.yaml), which need network
and accelerators to run for real: every step validates and fits together, the real architectures have their
published parameter counts, and every training step (sft, rm, ppo) compiles on the 8-device CPU mesh with the
step's own batch sizes, sequence lengths, optimizer, accumulation and PPO settings, on a tiny stand-in model of
the same family. Inputs are abstract (jax.ShapeDtypeStruct with shardings): nothing is downloaded, nothing large
is allocated and nothing runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import hf, loop, pipeline, ppo, ppo_stage, sharding, steps, trainers
from rlhf_jax.clock import LapClock
from rlhf_jax.data import formats
from rlhf_jax.model import PAD_ID, ModelConfig, init_params, make_model
from rlhf_jax.ppo_losses import KLController
from rlhf_jax.sampling import SamplingParams

CONFIGS = Path(__file__).parent.parent / "configs"

# The real architectures, as our hf.config_from_hf reads their published config.json.
GPT2_124M = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        head_dim=64, d_ff=3072, max_position_embeddings=1024, norm_eps=1e-5, tie_embeddings=True,
                        bos_token_id=50256, eos_token_ids=(50256,))
QWEN25_05B = ModelConfig(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=64, d_ff=4864, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
                         qkv_bias=True, tie_embeddings=True, bos_token_id=151643, eos_token_ids=(151643,))
# The fields of their config.json that matter to us (openai-community/gpt2, Qwen/Qwen2.5-0.5B).
HF_CONFIGS = {
    "tldr_gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12,
                      n_head=12, n_positions=1024, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                      bos_token_id=50256, eos_token_id=50256),
    "hh_qwen2.5_0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True,
                            use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
}
# Tiny stand-ins: the same family, flags and position table; one small layer (compile time grows with layers).
TINY = dict(vocab_size=128, d_model=32, n_layers=1, head_dim=8, d_ff=64, eos_token_ids=(1,))

REFERENCES = {
    # name: (real architecture, its exact parameter count, the tiny stand-in, its base model dir)
    "tldr_gpt2": (GPT2_124M, 124_439_808, dataclasses.replace(GPT2_124M, n_heads=4, n_kv_heads=4, **TINY),
                  "models/gpt2"),
    "hh_qwen2.5_0.5b": (QWEN25_05B, 494_032_768, dataclasses.replace(QWEN25_05B, n_heads=4, n_kv_heads=2, **TINY),
                        "models/qwen2.5-0.5b"),
}
URLS = {"tldr_sft": [formats.TLDR_SFT_URLS["train"]], "tldr_prompts": [formats.TLDR_SFT_URLS["train"]],
        "tldr_comparisons": [formats.TLDR_COMPARISONS_URL.format(n=n) for n in formats.TLDR_COMPARISONS_BATCHES],
        **{fmt: [formats.HH_RLHF_URLS["helpful-base/train"]] for fmt in ("hh_rlhf", "hh_rlhf_sft", "hh_rlhf_prompts")}}
STAND_IN_EXAMPLES = 10_000  # train.epochs needs the dataset's size, only for the schedule's length
STAND_IN_RESPONSES = 4  # ranking slots per prompt (at run time: the prepared dataset's largest K)
# Whether a step compiles does not depend on how hard LLVM optimises the CPU code; this halves the compile time.
FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


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
        assert cfg.model.dtype == "bfloat16" and cfg.mesh.shape[0] == -1 and cfg.mesh.axes[0] == "data"
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
    loop.check_positions(real, sft.data.max_prompt_tokens + sft.data.max_response_tokens, "sft")
    loop.check_positions(real, ppo_cfg.data.max_prompt_tokens + ppo_cfg.sampling.max_new_tokens, "ppo")


@pytest.mark.parametrize("name", list(REFERENCES))
def test_real_architecture_has_its_published_parameter_count(name):
    real, n_params, _, _ = REFERENCES[name]
    assert hf.config_from_hf(HF_CONFIGS[name]) == (real, "lm")
    shapes = jax.eval_shape(lambda: init_params(make_model(real, dtype="bfloat16"), jax.random.key(0)))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == n_params


# ----------------------------------------------------------------------------------------------------- compiling


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _inputs(shapes: dict, mesh) -> dict:
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}


def _compile_train_step(cfg, tiny: ModelConfig):
    """The sft / rm step as trainers.train builds and jits it, lowered on abstract inputs and compiled."""
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    loop.micro_batch_size(cfg, mesh)  # the stage's own batch / accumulation / mesh check
    model = make_model(tiny, "lm" if cfg.stage == "sft" else "scalar", cfg.model.dtype, cfg.model.param_dtype,
                       remat=cfg.model.remat == "block")
    total = cfg.train.steps or loop.total_steps(cfg, STAND_IN_EXAMPLES)
    optimizer = steps.make_optimizer(cfg.optim, total)
    stage = trainers._Stage(cfg, model, optimizer, steps.lr_schedule(cfg.optim, total))
    state_sh = loop.state_shardings(model, optimizer, mesh)
    state = _abstract(jax.eval_shape(lambda: steps.init_state(init_params(model, jax.random.key(0)), optimizer)),
                      state_sh)
    B, P, R = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    if cfg.stage == "sft":
        shapes = {"ids": ((B, P + R), jnp.int32), "mask": ((B, P + R), bool), "response_mask": ((B, P + R), bool),
                  "positions": ((B, P + R), jnp.int32), "segment_ids": ((B, P + R), jnp.int32)}
    else:
        K = STAND_IN_RESPONSES
        shapes = {"prompt_ids": ((B, P), jnp.int32), "prompt_mask": ((B, P), bool),
                  "response_ids": ((B, K, R), jnp.int32), "response_mask": ((B, K, R), bool),
                  "pairs": ((B, K, K), jnp.int32)}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    batch = _inputs({**shapes, "truncated": ((B,), bool)}, mesh)
    return loop.jit_step(stage.step, state_sh, mesh).lower(state, batch, rng).compile(FAST_CODEGEN)


def _compile_ppo_iteration(cfg, tiny: ModelConfig):
    """One PPO iteration as ppo_stage.train_ppo builds and jits it, lowered on abstract inputs and compiled."""
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    p, s, B, accum = cfg.ppo, cfg.sampling, cfg.train.batch_size, cfg.optim.grad_accum_steps
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    assert B % p.minibatches == 0 and (B // p.minibatches) % (accum * ways) == 0  # the stage's own check
    dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat == "block")
    policy, value = make_model(tiny, "lm", **dtypes), make_model(tiny, "scalar", **dtypes)
    updates = cfg.train.steps * p.epochs * p.minibatches
    value_optim = dataclasses.replace(cfg.optim, lr=p.value_lr or cfg.optim.lr)
    models = ppo.PPOModels(
        policy=policy, value=value, reward=value, policy_opt=steps.make_optimizer(cfg.optim, updates),
        value_opt=steps.make_optimizer(value_optim, updates),
        sampling=SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, tiny.eos_token_ids, PAD_ID),
        ppo=p, samples=min(ppo_stage.SAMPLES, B) if p.samples_every else 0, accum=accum, clock=LapClock())
    repl = sharding.replicated(mesh)
    policy_sh = loop.state_shardings(policy, models.policy_opt, mesh)
    value_sh = loop.state_shardings(value, models.value_opt, mesh)
    state_sh = ppo.PPOState(policy=policy_sh, value=value_sh, kl=KLController(repl), rng=repl,
                            ema=policy_sh.params if p.ema_decay else None)
    key = jax.random.key(0)
    state = _abstract(jax.eval_shape(lambda: ppo.init_state(init_params(policy, key), init_params(value, key), models,
                                                            jax.random.PRNGKey(0))), state_sh)
    frozen = ppo.Frozen(ref_params=state.policy.params, reward_params=state.value.params)
    P = cfg.data.max_prompt_tokens
    prompts = _inputs({"ids": ((B, P), jnp.int32), "mask": ((B, P), bool)}, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    iteration = jax.jit(lambda st, fr, ids, mask, ptx: ppo.iteration(st, fr, ids, mask, ptx, models=models),
                        in_shardings=(state_sh, ppo.Frozen(policy_sh.params, value_sh.params), batch_sh, batch_sh,
                                      batch_sh),
                        out_shardings=(state_sh, repl), donate_argnums=0)
    return iteration.lower(state, frozen, prompts["ids"], prompts["mask"], None).compile(FAST_CODEGEN)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_training_step_compiles_at_the_configs_sizes(name, stage):
    cfg, tiny = _stage(name, stage), REFERENCES[name][2]
    compiled = _compile_ppo_iteration(cfg, tiny) if stage == "ppo" else _compile_train_step(cfg, tiny)
    state_out, metrics_out = compiled.output_shardings
    assert all(s.mesh.devices.size == 8 for s in jax.tree.leaves(state_out))
    assert np.all([m.is_fully_replicated for m in jax.tree.leaves(metrics_out)])
