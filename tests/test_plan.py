"""--dry-run (rlhf_jax/plan/): each training program compiled on abstract inputs for the configured mesh, its
memory per device, FLOPs and verdict; a suggestion that is real; nothing written; a Llama-3-8B-shaped pipeline
planned for 64 simulated devices in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

from cli_helpers import run_quietly
from rlhf_jax import main as main_cli
from rlhf_jax import pipeline, plan
from rlhf_jax.config import load_config
from rlhf_jax.errors import UserError
from rlhf_jax.plan.devices import GIB, budget, device_spec, gib
from rlhf_jax.plan.figures import Measured, footprint, measure
from rlhf_jax.plan.flops import hlo_matmul_flops
from rlhf_jax.plan.models import tiny_model_config
from rlhf_jax.plan.planner import Planner
from rlhf_jax.plan.programs import train_step_program
from rlhf_jax.models.transformer import init_params, make_model
from rlhf_jax.runtime import sharding

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# A small sft step whose memory gradient accumulation visibly changes.
SFT = ["stage=sft", "data.name=demos", "train.batch_size=32", "train.steps=10", "data.max_prompt_tokens=16",
       "data.max_response_tokens=48"]
# Meta-Llama-3-8B's config.json (the fields that matter); the weights are never needed.
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
             "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def dry_run(*argv) -> tuple[int, str, str]:
    return run_quietly(main_cli.main, [*argv, "--dry-run"])


def table_rows(out: str) -> dict[str, list[str]]:
    """step -> the cells of its row in the dry run's table (cells are separated by two or more spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "stage", "batch"])
    rows = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(re.split(r"\s{2,}", lines[start].strip())):
            break
        rows[cells[0]] = cells
    return rows


BYTES = re.compile(r"^\d+(\.\d)? (B|KiB|MiB|GiB|TiB)$")


def _sft_cfg(tmp_path, *extra):
    return load_config(None, [*SFT, f"run_dir={tmp_path / 'run'}", *extra])


_measured: dict = {}


def _measure(cfg, mesh=None) -> Measured:
    key = (cfg.optim.grad_accum_steps, cfg.model.remat, None if mesh is None else mesh.size)
    if key not in _measured:
        mesh = mesh or sharding.mesh_from_config(cfg.mesh)
        _measured[key] = measure(train_step_program(cfg, tiny_model_config(), mesh), mesh)
    return _measured[key]


# ----------------------------------------------------------------------------------------------------- the CLI


def test_dry_run_of_the_demo_plans_sft_rm_and_ppo_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = dry_run("--config", DEMO, f"run_dir={run_dir}")
    assert rc == 0, err
    rows = table_rows(out)
    assert {step: cells[1] for step, cells in rows.items()} == {"pretrain": "sft", "sft": "sft", "rm": "rm",
                                                                "dpo": "dpo", "ppo": "ppo"}
    assert rows["dpo"][2] == "32 x 4 x (16+16) tokens"
    assert rows["rm"][2] == "32 x 4 x (16+16) tokens"  # K from the label step that writes the rankings
    assert rows["ppo"][2] == "64 x (16+16 new) tokens"
    for cells in rows.values():
        arguments, outputs, temps, aliased, total = cells[5:10]
        assert all(BYTES.match(c) for c in cells[5:10]), cells
        assert re.match(r"^\d+(\.\d+)? [KMGTP]$", cells[10]), cells  # FLOPs per step per device
        assert cells[11:] == ["-", "-"]  # CPU: no peak and no memory known, so no time and no verdict
    for step in ("task", "label", "eval"):
        assert f"{step} ({step}): not planned" in out
    # the models the steps before make, traced back to the tiny model the task step builds
    assert f"rm: model {run_dir}/sft/export is not made yet: taken as the lm-head model steps sft <- pretrain " \
           "<- task make from a tiny model" in out
    assert f"ppo: ppo.reward_model {run_dir}/rm/export is not made yet" in out
    assert "no verdict: the device memory is unknown (pass --device-memory GIB)" in out
    assert "sharding: params over mesh data=8 fsdp=1 tensor=1 (8 devices)" in out
    assert not run_dir.exists() and not list(tmp_path.iterdir())


def test_a_step_that_does_not_fit_gets_a_real_suggestion(tmp_path):
    one, four = (_measure(_sft_cfg(tmp_path, f"optim.grad_accum_steps={a}")) for a in (1, 4))
    assert four.footprint.total < one.footprint.total
    assert four.footprint.arguments == one.footprint.arguments  # params, optimizer state and batch: the same
    memory = four.footprint.total  # no remat with 1 or 2 micro-batches needs more
    rc, out, err = dry_run(*SFT, f"run_dir={tmp_path / 'run'}", "--device-memory", str(memory / GIB))
    assert rc == plan.NO_FIT == 5, err
    assert table_rows(out)["sft"][12] == "NO"
    found = re.search(r"sft: does not fit: needs (.+) of (.+) per device; fits with optim.grad_accum_steps=(\d+) "
                      r"model.remat=(none|block) \((.+)\)", out)
    assert found, out
    accum, remat = int(found.group(3)), found.group(4)
    assert (accum, remat) == (4, "none")  # no remat first, then the fewest micro-batches that fit
    suggested = _measure(_sft_cfg(tmp_path, f"optim.grad_accum_steps={accum}", f"model.remat={remat}"))
    assert suggested.footprint.total <= memory
    assert f"({gib(suggested.footprint.total)})" in out
    assert f"does not fit: sft (exit status {plan.NO_FIT})" in out
    assert not (tmp_path / "run").exists()

    # Accumulating in a loop does not change the step's FLOPs (XLA alone would count the loop body once).
    assert four.flops == pytest.approx(one.flops, rel=0.05)  # elementwise ops in loop bodies still count once

    rc, out, _ = dry_run(*SFT, f"run_dir={tmp_path / 'run'}", "--device-memory", "0.0001")
    assert rc == plan.NO_FIT
    assert re.search(r"sft: does not fit: needs .+ of 104\.9 KiB per device; nothing fits: its arguments and "
                     r"outputs alone \(params, optimizer state, frozen models, batch\) take .+; shard them", out)


def test_config_and_flag_errors_are_one_line_before_anything_compiles(tmp_path):
    import json

    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    for argv, message in [
        ([*SFT, f"model.path={tmp_path}/yarn"], f"error: model.path={tmp_path}/yarn: {tmp_path}/yarn/config.json: "),
        ([*SFT, "optim.lr=x"], "error: 'optim.lr' expects a float"),
        ([*SFT, "--device-memory", "lots"], "error: --device-memory 'lots': expected a number"),
        ([*SFT, "--peak-tflops", "0"], "error: --peak-tflops '0': must be a finite number > 0"),
        ([*SFT, "--device-memory", "inf"], "error: --device-memory 'inf': must be a finite number > 0"),
        ([*SFT, "data.max_response_tokens=600"],  # what the run refuses once it has read the model
         "error: data.max_prompt_tokens + data.max_response_tokens = 616 exceeds the model's 512 positions (the "
         "built-in tiny model)"),
        ([*SFT, "train.eval_batch_size=12"], "error: train.eval_batch_size=12 is not divisible by the 8"),
        (["stage=rm", "data.name=nowhere", f"data.dir={tmp_path}", "train.steps=2"],
         "error: data.max_responses: the rm dry run needs the response slots per prompt K"),
        (["stage=ppo", "data.name=prompts"], "error: stage 'ppo' needs ppo.reward_model"),
        ([*SFT, f"model.path={tmp_path}/nowhere"], f"error: model.path={tmp_path}/nowhere: does not exist"),
        (["stage=ppo", "data.name=prompts", f"model.path={tmp_path}/nowhere", "ppo.reward_model=rm", "train.steps=2"],
         f"error: model.path={tmp_path}/nowhere: does not exist"),
        (["stage=ppo", "data.name=prompts", "ppo.reward_model=rm", "ppo.ptx_coef=1", "ppo.ptx_dataset=demos",
          "data.max_response_tokens=400", "train.steps=2"],
         "error: data.max_prompt_tokens + data.max_response_tokens (the ptx rows) = 656 exceeds the model's 512 "
         "positions (the built-in tiny model)"),
        (["stage=ppo", "data.name=prompts", "ppo.reward_model=rm", "sampling.max_new_tokens=300", "train.steps=2"],
         "error: data.max_prompt_tokens + sampling.max_new_tokens = 556 exceeds the model's 512 positions (the "
         "built-in tiny model)"),
    ]:
        rc, out, err = dry_run(*argv, f"run_dir={tmp_path / 'run'}")
        assert rc == 2 and err.startswith(message) and len(err.splitlines()) == 1, (argv, err)
    (tmp_path / "own" / "tiny_model").mkdir(parents=True)  # no model.path: the run's built-in tiny model's file
    (tmp_path / "own" / "tiny_model" / "config.json").write_text('{"model_type": ')
    rc, _, err = dry_run(*SFT, f"run_dir={tmp_path / 'own'}")
    assert rc == 2 and err.startswith(f"error: {tmp_path / 'own' / 'tiny_model' / 'config.json'}: invalid JSON"), err
    rc, _, err = run_quietly(main_cli.main, [*SFT, "--device-memory", "8"])
    assert rc == 2 and err == "error: --device-memory and --peak-tflops go with --dry-run\n"
    assert not (tmp_path / "run").exists()


def test_models_come_from_their_config_files_and_a_missing_reward_model_from_the_policy(tmp_path):
    def program(*overrides):
        cfg = load_config(None, ["stage=ppo", "data.name=prompts", f"run_dir={tmp_path / 'run'}", *overrides])
        planner = Planner([pipeline.Step("ppo", cfg)], budget(jax.devices()[0]), False)
        return planner.program(planner.steps[0])

    tiny = tiny_model_config()
    missing = program(f"ppo.reward_model={tmp_path / 'rm'}")  # read nothing, compiled nothing
    assert missing.models == [(tiny, "lm"), (tiny, "scalar")] and missing.batch == "16 x (256+64 new) tokens"
    assert missing.notes == ["policy: the tiny built-in model", f"ppo.reward_model: {tmp_path / 'rm'} does not "
                             "exist: the policy's architecture with a scalar head"]
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA3_8B))  # config.json alone: no weights
    (tmp_path / "llama_rm").mkdir()
    (tmp_path / "llama_rm" / "config.json").write_text(json.dumps(
        {**LLAMA3_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}))
    with pytest.raises(UserError, match="ppo.reward_model: vocab_size 128256 differs from the policy's 512"):
        program(f"ppo.reward_model={tmp_path / 'llama_rm'}")
    with pytest.raises(UserError, match=f"ppo.reward_model={tmp_path / 'llama'}: a language model, expected a "
                                        "scalar-head"):  # as the run refuses it
        program(f"model.path={tmp_path / 'llama'}", f"ppo.reward_model={tmp_path / 'llama'}")
    llama = program(f"model.path={tmp_path / 'llama'}", f"ppo.reward_model={tmp_path / 'llama_rm'}")
    assert llama.models[0][0].n_layers == 32 and llama.models[0][0].rope_theta == 500000.0 and not llama.notes
    assert llama.models[1] == (llama.models[0][0], "scalar")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------- the numbers


def test_the_search_tries_every_split_the_stage_accepts(tmp_path):
    """Every accumulation the batch divides into (3 too), and for GRPO with shared prompts only those whose
    micro-batches hold whole groups (the stage refuses the others)."""
    from rlhf_jax.plan.planner import candidates

    one = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1])
    sft = load_config(None, [*SFT, "train.batch_size=6"])
    assert candidates(sft, one) == [("none", a) for a in (2, 3, 6)] + [("block", a) for a in (1, 2, 3, 6)]
    grpo = load_config(None, ["stage=grpo", "data.name=p", "train.steps=1", "train.batch_size=4", "grpo.group_size=8",
                              "grpo.minibatches=1", "grpo.reward_function=rlhf_jax.tasks.sentiment:gold"])
    assert [a for _, a in candidates(grpo, one)] == [2, 4, 1, 2, 4]


def test_flops_are_per_device_and_fast_cpu_codegen_leaves_memory_alone(tmp_path):
    cfg = _sft_cfg(tmp_path)
    eight = _measure(cfg)
    one_device = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), jax.devices()[:1])
    alone = _measure(cfg, one_device)
    assert eight.flops * 8 == pytest.approx(alone.flops, rel=0.05)  # each device does an eighth of the batch
    mesh = sharding.mesh_from_config(cfg.mesh)
    lowered = train_step_program(cfg, tiny_model_config(), mesh)
    assert footprint(lowered.compile()) == eight.footprint  # without CPU_COMPILE_OPTIONS


def test_fsdp_gathers_weights_to_the_rows_instead_of_rows_to_the_weights(tmp_path):
    """On an fsdp axis each device keeps its rows and gathers the weights (`sharding.jit` + `constrain_batch`);
    left to itself XLA split this step's matmuls by the weights' FSDP dimension and replicated the activations:
    3.9x the data-parallel temporaries here, 67 GiB instead of 10 for Qwen2.5-0.5B's PPO step."""
    cfg = _sft_cfg(tmp_path)
    data_parallel = _measure(cfg)
    fsdp_mesh = sharding.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    fsdp = measure(train_step_program(cfg, tiny_model_config(), fsdp_mesh), fsdp_mesh)
    assert fsdp.footprint.arguments < data_parallel.footprint.arguments / 6  # params and Adam split 8 ways
    assert fsdp.footprint.temporaries < 1.3 * data_parallel.footprint.temporaries
    assert fsdp.flops == pytest.approx(data_parallel.flops, rel=0.1)  # each device still does about its eighth


def test_matmul_flops_contract_the_dimensions_the_dot_names():
    """A backward pass's weight gradient contracts the rows (x^T dy: the lhs's first dimension), a batched
    attention product its last: each dot counts 2 x output x the product of its lhs's contracting sizes."""
    hlo = """HloModule m

ENTRY %main (x: f32[64,16], dy: f32[64,8], q: f32[4,5,16], k: f32[4,16,7]) -> f32[16,8] {
  %x = f32[64,16]{1,0} parameter(0)
  %dy = f32[64,8]{1,0} parameter(1)
  %q = f32[4,5,16]{2,1,0} parameter(2)
  %k = f32[4,16,7]{2,1,0} parameter(3)
%s = f32[4,5,7] dot(%q, %k), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT %dw = f32[16,8]{1,0} dot(%x, %dy), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}
"""
    assert hlo_matmul_flops(hlo)[0] == 2 * 16 * 8 * 64 + 2 * 4 * 5 * 7 * 16


def test_matmul_flops_count_loop_bodies_by_their_trip_count():
    hlo = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %w0 = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %e = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    body, entry = 2 * 8 * 16 * 16, 2 * 8 * 4 * 16
    assert hlo_matmul_flops(hlo) == (entry + 5 * body, entry + body, 0)
    # a loop that may stop early (no known trip count) is counted at the most trips its name gives, or once
    early = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}',
                        ', metadata={op_name="jit(f)/at_most_7_trips/while" stack_frame_id=2}')
    assert hlo_matmul_flops(early) == (entry + 7 * body, entry + body, 0)
    unnamed = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
    assert hlo_matmul_flops(unnamed) == (entry + body, entry + body, 1)
    # on a GPU, XLA hands dots to cuBLAS: custom-calls, with a workspace beside the result or without, a batch
    # dimension, the lhs' shape written beside it or only where it was defined
    config = ('backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":'
              '{"lhs_contracting_dimensions":["%s"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[%s],'
              '"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}')
    gpu = hlo.replace(
        "%d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        '%g = (f32[8,16]{1,0}, s8[1024]{0}) custom-call(f32[8,16]{1,0} %x, f32[16,16]{1,0} %w), '
        'custom_call_target="__cublas$gemm", ' + config % ("1", "")).replace(
        "ROOT %e = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        '%c = f32[8,16]{1,0} copy(%a)\n  ROOT %e = f32[2,8,4]{2,1,0} custom-call(%c, %b), '
        'custom_call_target="__cublas$lt$matmul", ' + config % ("1", '"0"'))
    assert hlo_matmul_flops(gpu) == (2 * entry + 5 * body, 2 * entry + body, 0)
    # a dot in a branch of a conditional in the loop body (a lax.cond in a scan) runs once per trip too
    branchy = hlo.replace("%cond (p:", """%branch (q: f32[8,16]) -> f32[8,16] {
  %q = f32[8,16]{1,0} parameter(0)
  %v = f32[16,16]{1,0} constant({...})
  ROOT %bd = f32[8,16]{1,0} dot(%q, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (p:""").replace("  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)", (
        "  %k = f32[8,16]{1,0} conditional(%i, %d, %d), branch_computations={%branch, %branch}\n"
        "  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %k)"))
    assert hlo_matmul_flops(branchy) == (entry + 5 * 3 * body, entry + 3 * body, 0)  # its dot and two branches


def test_flops_per_device_adds_the_trips_xla_counts_once():
    """XLA's cost analysis counts a loop body once: the step's FLOPs are its count plus the body's matmuls for
    every further trip (4 more of a 5-trip loop), not plus all 5."""
    from types import SimpleNamespace

    from rlhf_jax.plan.flops import flops_per_device

    hlo = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,16]{1,0} constant({...})
  ROOT %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  ROOT %w0 = (s32[], f32[8,16]{1,0}) while(%a), condition=%c, body=%body, backend_config={"known_trip_count":{"n":"5"}}
}
"""
    compiled = SimpleNamespace(cost_analysis=lambda: {"flops": 1000.0}, as_text=lambda: hlo)
    assert flops_per_device(compiled) == (1000.0 + 4 * 2 * 8 * 16 * 16,
                                          "the matmuls of loop bodies counted once per trip")
    # a loop that may stop early (no known trip count: the sampler's decode) is counted at its most trips, named
    early = SimpleNamespace(cost_analysis=lambda: {"flops": 1000.0}, as_text=lambda: hlo.replace(
        ', backend_config={"known_trip_count":{"n":"5"}}', ', metadata={op_name="jit(f)/at_most_63_trips/while"}'))
    assert flops_per_device(early) == (1000.0 + 62 * 2 * 8 * 16 * 16,
                                       "the matmuls of loop bodies counted once per trip")
    unnamed = SimpleNamespace(cost_analysis=lambda: {"flops": 1000.0},
                              as_text=lambda: hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', ""))
    assert flops_per_device(unnamed) == (1000.0, "the matmuls of loop bodies counted once per trip; 1 loop(s) of no "
                                                 "known or named trip count counted once")


def test_a_donated_update_counts_its_buffer_once():
    """An update written into its donated input holds one buffer, a copy two: the total is what must fit."""
    x = jnp.zeros((256, 1024), jnp.float32)
    for donate, buffers in ((True, 1), (False, 2)):
        fn = jax.jit(lambda x: x + 1, donate_argnums=(0,) if donate else ())
        f = footprint(fn.lower(x).compile())
        assert f.total - f.temporaries - f.code == buffers * x.nbytes, f


def test_the_search_tries_only_accumulations_the_batch_splits_into_over_the_devices():
    from rlhf_jax.plan.planner import candidates
    from rlhf_jax.runtime import sharding

    mesh = sharding.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
    accums = lambda *overrides: sorted({a for _, a in candidates(load_config(None, overrides), mesh)})
    assert accums("stage=sft", "train.batch_size=32") == [1, 2, 4]  # 32 rows = accum x 8 devices x rows each
    # PPO-ptx: its pretraining batch splits the same way (24 / 2 minibatches = 12 rows: over 8 devices, none)
    ppo = ("stage=ppo", "train.batch_size=32", "ppo.minibatches=2", "ppo.ptx_coef=0.1", "ppo.ptx_dataset=x")
    assert accums(*ppo, "ppo.ptx_batch_size=48") == [1] and accums(*ppo, "ppo.ptx_batch_size=24") == []
    # GRPO's rows are prompts x group: without shared prompt passes a micro-batch may hold part of a group
    grpo = ("stage=grpo", "train.batch_size=2", "grpo.group_size=16", "grpo.reward_function=m:f")
    assert accums(*grpo, "grpo.share_prompts=false") == [1, 2, 4] and accums(*grpo) == [1, 2]


def test_an_rm_dry_runs_response_slots_count_every_policy_and_round(tmp_path, monkeypatch):
    """K of an rm step before its rankings exist: the label step's responses for each policy it samples and each
    earlier round's rankings it includes, unless data.max_responses says."""
    from rlhf_jax.plan.models import response_slots

    monkeypatch.chdir(tmp_path)  # no prepared dataset here
    label = load_config(None, ["stage=label", "label.dataset=ranked", "label.responses=4", "label.policies=[p2]",
                               "label.include=[r1.jsonl, r2.jsonl]", "label.labeler=m:f", "model.path=p1"])
    rm = load_config(None, ["stage=rm", "data.name=ranked"])
    steps = [pipeline.Step("label", label), pipeline.Step("rm", rm)]
    assert response_slots(rm, steps) == 4 * 2 * 3
    assert response_slots(load_config(None, ["stage=rm", "data.name=ranked", "data.max_responses=6"]), steps) == 6


def test_device_defaults():
    class Device:
        def __init__(self, kind, platform, limit=None):
            self.device_kind, self.platform, self._limit = kind, platform, limit

        def memory_stats(self):
            return {"bytes_limit": self._limit} if self._limit else None

    h100 = budget(Device("NVIDIA H100 80GB HBM3", "gpu"))
    assert h100.memory == 80 * GIB and h100.peak == {"bfloat16": 989e12, "float32": 67e12}
    assert budget(Device("NVIDIA H100 80GB HBM3", "gpu", limit=60 * GIB)).memory == 60 * GIB
    assert budget(Device("TPU v4", "tpu", limit=30 * GIB)).memory == 30 * GIB  # the allocator's, on any accelerator
    assert budget(Device("NVIDIA H100 PCIe", "gpu")).peak == {"bfloat16": 756e12, "float32": 51e12}
    assert device_spec("NVIDIA GH200 480GB").name == "GH200" and device_spec("NVIDIA H200").name == "H200"
    v5e = budget(Device("TPU v5 lite", "tpu"))
    assert v5e.memory == 16 * GIB and v5e.peak == {"bfloat16": 197e12, "float32": None}
    assert device_spec("TPU v5p").name == device_spec("TPU v5").name == "TPU v5p"
    published = {"NVIDIA A100-SXM4-40GB": (40, 312e12), "NVIDIA A100-SXM4-80GB": (80, 312e12),  # vendors' sheets
                 "NVIDIA H200": (140, 989e12), "NVIDIA GH200 480GB": (96, 989e12), "TPU v3": (16, 61.5e12),
                 "TPU v4": (32, 275e12), "TPU v5p": (95, 459e12), "TPU v6 lite": (32, 918e12)}
    for kind, (gib_, bf16) in published.items():
        b = budget(Device(kind, "tpu" if kind.startswith("TPU") else "gpu"))
        assert (b.memory, b.peak["bfloat16"]) == (gib_ * GIB, bf16), kind
    cpu = budget(Device("cpu", "cpu"))
    assert cpu.memory is None and cpu.peak == {} and "--device-memory" in cpu.memory_source
    given = budget(Device("cpu", "cpu"), memory_gib=2, peak_tflops=3)
    assert given.memory == 2 * GIB and given.peak == {"bfloat16": 3e12, "float32": 3e12}


# ----------------------------------------------------------------------------------------------------- Llama-3-8B


EIGHT_B_TEST = "test_llama3_8b_pipeline_on_64_devices"


@pytest.fixture(scope="module", autouse=True)
def llama3_8b_dry_run(request, tmp_path_factory):
    """The dry run of configs/llama3_8b_plan.yaml with Llama-3-8B's config.json (no weights, no tokenizer) on 64
    simulated CPU devices, in a subprocess started before this module's first test: XLA compiles on one core, so
    it runs beside the tests above on the other. Compiling a 32-layer step takes about 20 s on 2 cores (sft, rm)
    and the whole ppo iteration about 100 s, so the suite plans the sft step at the full shape and
    RLHF_JAX_PLAN_8B=all plans every step of the config (about 3.5 minutes)."""
    if not any(item.name == EIGHT_B_TEST for item in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("llama3_8b")
    model = tmp / "llama-3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    config = yaml.safe_load((ROOT / "configs" / "llama3_8b_plan.yaml").read_text())
    every_step = os.environ.get("RLHF_JAX_PLAN_8B") == "all"
    if not every_step:
        config["pipeline"] = {"sft": config["pipeline"]["sft"]}
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the steps in order
    run_dir = tmp / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=64", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "rlhf_jax.main", "--config", str(path), f"run_dir={run_dir}",
            f"pipeline.sft.model.path={model}", "--dry-run", "--device-memory", "80", "--peak-tflops", "989"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    started = time.perf_counter()
    yield {"proc": proc, "started": started, "model": model, "run_dir": run_dir, "every_step": every_step}
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_llama3_8b_pipeline_on_64_devices(llama3_8b_dry_run):
    run = llama3_8b_dry_run
    out, err = run["proc"].communicate(timeout=900)
    print(f"dry run of Llama-3-8B on 64 devices: {time.perf_counter() - run['started']:.0f} s after it started")
    rc, model, run_dir = run["proc"].returncode, run["model"], run["run_dir"]
    assert rc in (0, plan.NO_FIT), err[-3000:]
    assert "64 cpu devices" in out and "device memory: 80.0 GiB (--device-memory)" in out
    assert "lm-head model (d_model 4096, 32 layers, vocab 128256):" in out
    assert re.search(r"total\s+9\s+29\.9 GiB\s+3\.7 GiB", out)  # 8.03 B float32 params, 32 layers stacked, FSDP
    rows = table_rows(out)
    assert list(rows) == (["sft", "rm", "ppo"] if run["every_step"] else ["sft"])
    for step, cells in rows.items():
        assert all(BYTES.match(c) for c in cells[5:10]), cells
        assert cells[5].endswith("GiB")  # the params and Adam moments alone: gigabytes per device
        assert re.match(r"^\d+(\.\d+)? (ms|s)$", cells[11]), cells  # the least step time at 989 TFLOP/s
        assert cells[12] in ("yes", "NO")
        if cells[12] == "NO":
            assert re.search(rf"{step}: does not fit: needs .+ of 80\.0 GiB per device; ", out)
    assert (rc == plan.NO_FIT) == any(cells[12] == "NO" for cells in rows.values())
    temps = rows["sft"][7]  # 14.9 GiB; 47.5 when XLA replicated the activations over the fsdp axis
    assert temps.endswith(" GiB") and float(temps.split()[0]) < 20, rows["sft"]
    assert rows["sft"][2] == "64 x 1024 tokens"
    # 6 x 8.03e9 params x 1024 tokens per device = 49 TFLOPs per step
    assert re.match(r"^4[5-9](\.\d+)? T$", rows["sft"][10]), rows["sft"]
    # As XLA's CPU compiler assigns the buffers, the sft step (one 1024-token row per device) fits 80 GiB.
    assert rows["sft"][12] == "yes"
    if run["every_step"]:
        assert f"rm: model {run_dir}/sft/export is not made yet: taken as the lm-head model step sft makes from " \
               f"{model}" in out
        assert f"ppo: ppo.reward_model {run_dir}/rm/export is not made yet: taken as the scalar-head model steps " \
               f"rm <- sft make from {model}" in out
    assert not run_dir.exists()


def test_lora_steps_are_planned_beside_full_finetuning(tmp_path):
    """With lora.rank, each step's row has its rank and the same step's total without LoRA; a LoRA dpo step holds
    one copy of the policy (its base, also the reference), full fine-tuning two and the optimizer's moments."""
    demo = yaml.safe_load(DEMO.read_text())
    demo["pipeline"] = {name: demo["pipeline"][name] for name in ("task", "pretrain", "sft", "label", "dpo")}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    rc, out, err = dry_run("--config", path, f"run_dir={tmp_path / 'run'}", "lora.rank=4")
    assert rc == 0, err
    rows = table_rows(out)
    assert list(rows) == ["pretrain", "sft", "dpo"] and all(cells[5] == "r4" for cells in rows.values()), rows
    size = lambda cell: float(cell.split()[0]) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[cell.split()[1]]
    for cells in rows.values():
        lora_total, full_total = size(cells[10]), size(cells[11])
        assert lora_total < full_total, cells


def test_dpo_holds_its_reference_as_an_argument_unless_precomputed(tmp_path):
    """The dpo step's arguments hold the frozen reference beside the policy's state; with
    dpo.precompute_reference they hold its (B, K) log-probs instead."""
    args = ["stage=dpo", "data.name=rankings", "data.max_responses=4", "train.batch_size=16", "train.steps=5",
            "data.max_prompt_tokens=16", "data.max_response_tokens=16", f"run_dir={tmp_path / 'run'}"]
    mesh = sharding.mesh_from_config(load_config(None, args).mesh)
    sizes = {}
    for precompute in (False, True):
        cfg = load_config(None, [*args, f"dpo.precompute_reference={str(precompute).lower()}"])
        sizes[precompute] = measure(train_step_program(cfg, tiny_model_config(), mesh, responses=4),
                                    mesh).footprint.arguments
    model = make_model(tiny_model_config())
    reference_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda: init_params(model, jax.random.key(0)))))
    # the default mesh is data-parallel: every device holds the whole reference, or its rows' (B, K) log-probs
    ref_logps_bytes = 16 * 4 * 4 // mesh.size
    assert sizes[False] - sizes[True] == reference_bytes - ref_logps_bytes, (sizes, reference_bytes)


def test_grpo_iteration_holds_the_reward_model_only_when_it_scores(tmp_path):
    """The planned GRPO iteration's arguments hold the policy's state and reference, plus the reward model when
    one scores the responses; with a reward function (a host callback) they do not."""
    from rlhf_jax.plan.programs import group_iteration_program

    args = ["stage=grpo", "data.name=prompts", "train.batch_size=4", "grpo.group_size=4", "train.steps=5",
            "data.max_prompt_tokens=8", "sampling.max_new_tokens=8", f"run_dir={tmp_path / 'run'}"]
    mesh = sharding.mesh_from_config(load_config(None, args).mesh)
    tiny = tiny_model_config()
    with_model = measure(group_iteration_program(load_config(None, [*args, "grpo.reward_model=rm"]), tiny, mesh,
                                                 tiny), mesh).footprint.arguments
    with_function = measure(group_iteration_program(load_config(None, [*args, "grpo.reward_function=m:f"]), tiny,
                                                    mesh), mesh).footprint.arguments
    scalar = make_model(tiny, "scalar")
    reward_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda: init_params(scalar, jax.random.key(0)))))
    assert with_model - with_function == reward_bytes  # replicated on the data-parallel mesh


def test_a_suggestion_for_a_repeated_step_names_it_as_an_override_can():
    """round{r}/NAME runs NAME's config: the override that sets it is pipeline.NAME.KEY (for every round)."""
    from types import SimpleNamespace

    from rlhf_jax.config import Config
    from rlhf_jax.pipeline import Step
    from rlhf_jax.plan.planner import Planner

    key = lambda name, is_pipeline=True: Planner.key(SimpleNamespace(is_pipeline=is_pipeline), Step(name, Config()),
                                                      "optim.grad_accum_steps")
    assert key("round2/rm") == key("rm") == "pipeline.rm.optim.grad_accum_steps"
    assert key("rm", is_pipeline=False) == "optim.grad_accum_steps"


def test_dpos_precomputed_reference_pass_is_planned_beside_the_training_state(tmp_path):
    """The pass that scores the data before training runs with the policy's state already placed: its peak is the
    state's bytes per device (sharded by the mesh) plus the pass's own; a LoRA policy's default reference is its
    base, counted once; a pass that does not fit fails the verdict and names what shrinks it."""
    from rlhf_jax.plan.programs import reference_scoring_program

    args = ["stage=dpo", "data.name=rankings", "data.max_responses=4", "train.batch_size=16", "train.steps=5",
            "data.max_prompt_tokens=16", "data.max_response_tokens=16", "dpo.precompute_reference=true",
            f"run_dir={tmp_path / 'run'}"]
    tiny = tiny_model_config()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda: init_params(make_model(tiny), jax.random.key(0)))))
    for shape, ways in (([8, 1, 1], 1), ([1, 8, 1], 8)):  # data-parallel: whole copies; fsdp: an eighth each
        cfg = load_config(None, [*args, f"mesh.shape={shape}"])
        _, resident, rows = reference_scoring_program(cfg, tiny, sharding.mesh_from_config(cfg.mesh), 4)
        # the params and Adam's two moments (the norms' scales stay whole on every device: 4 KiB at most)
        assert rows == 16 and 3 * param_bytes / ways <= resident <= 3 * param_bytes / ways + 4096, resident
    residents = {}
    for reference in ("", "other_policy"):
        cfg = load_config(None, [*args, "lora.rank=4", f"dpo.reference={reference}"])
        residents[reference] = reference_scoring_program(cfg, tiny, sharding.mesh_from_config(cfg.mesh), 4)[1]
    # another reference is placed beside the LoRA policy's frozen base (nearly all of the model); the default is it
    assert 0.9 * param_bytes < residents["other_policy"] - residents[""] <= param_bytes, (residents, param_bytes)

    big = [*args, "train.eval_batch_size=512"]
    rc, out, _ = dry_run(*big, "--device-memory", "100")
    assert rc == 0 and out.strip().endswith("every planned step fits"), out
    peak_line = next(line for line in out.splitlines() if "dpo.precompute_reference: before training" in line)
    assert "512 prompts at a time" in peak_line
    mib = lambda text: float(text.split()[0]) * {"KiB": 1 / 1024, "MiB": 1}[text.split()[1]]
    size = r"(\d+(?:\.\d)? [KM]iB)"
    peak, state, scoring = map(mib, re.search(rf": {size} per device at its peak \(the training state {size}, "
                                              rf"the reference and its pass {size}\)", peak_line).groups())
    assert abs(peak - (state + scoring)) <= 0.1 and state > 1.5, peak_line  # 3 x the 545 KiB params
    step_total = mib(table_rows(out)["dpo"][9])
    below = max(step_total, scoring)  # the step fits, and the pass would without the state placed beside it
    assert below < peak - 1, (step_total, scoring, peak)
    between = (below + peak) / 2 / 1024
    rc, out, _ = dry_run(*big, "--device-memory", str(between))
    assert rc == plan.NO_FIT and table_rows(out)["dpo"][-1] == "NO", out
    assert "the reference pass does not fit" in out and "lower train.eval_batch_size (now 512)" in out, out


def test_the_step_time_is_at_the_peak_of_the_steps_own_compute_dtype():
    from rlhf_jax.plan.devices import Budget
    from rlhf_jax.plan.figures import Footprint
    from rlhf_jax.plan.planner import StagePlan
    from rlhf_jax.plan.report import table

    measured = Measured(Footprint(GIB, 0, 2 * GIB, 0, 0), 2e12, "")
    peaks = Budget(None, "", {"bfloat16": 8e12, "float32": 1e12}, "")
    times = {}
    for dtype in ("float32", "bfloat16"):
        lines = table([StagePlan("s", "sft", "b", measured, None, [])], {"s": load_config(None, [
            "stage=sft", f"model.dtype={dtype}"])}, peaks)
        rows = table_rows("\n".join(lines))
        times[dtype], flops, total = rows["s"][-2], rows["s"][-3], rows["s"][-4]
        assert (flops, total) == ("2 T", "3.0 GiB"), rows
    assert times == {"float32": "2 s", "bfloat16": "250 ms"}


def test_a_later_rounds_models_are_the_earlier_rounds_outputs_with_their_heads(tmp_path):
    """Round 2's PPO starts from round 1's policy and value exports, which do not exist before the run: the plan
    takes them as the models round 1's ppo step trains, each with its own head."""
    from rlhf_jax.plan.models import Models

    run_dir, steps = pipeline.load(str(DEMO), [f"run_dir={tmp_path / 'run'}", "rounds=2",
                                               "repeat=[label, rm, dpo, ppo, eval]"])
    models = Models(steps)
    value = models.resolve(f"{run_dir}/round1/ppo/export_value", str(run_dir))
    policy = models.resolve(f"{run_dir}/round1/ppo/export", str(run_dir))
    assert (value.head, value.via[0], policy.head, policy.via[0]) == ("scalar", "round1/ppo", "lm", "round1/ppo")
    assert value.via[1] == "round1/rm" and policy.via[1:] == ("sft", "pretrain", "task")  # where they come from


@pytest.mark.parametrize("segment_min", [None, 4])
def test_the_samplers_loops_are_counted_at_their_most_trips(monkeypatch, segment_min):
    """The first new token comes from the prefill: the decode runs at most max_new_tokens - 1 steps, in one loop or
    in segments (`segment_min` 4: 3 loops of 5 steps over P + 5, P + 10 and P + 15 slots), each counted at its
    most trips: the matmul FLOPs are the prefill's plus those of every step, the attention's over its loop's slots."""
    from rlhf_jax.models import sampling
    from rlhf_jax.models.tiny import tiny_config
    from rlhf_jax.models.transformer import init_params, make_model
    from rlhf_jax.plan.flops import hlo_matmul_flops

    if segment_min is not None:
        monkeypatch.setattr(sampling, "DECODE_SEGMENT_MIN", segment_min)
    cfg = tiny_config(64, eos_id=1, pad_id=0)
    model = make_model(cfg)
    params = init_params(model, jax.random.key(0))
    B, P, N = 2, 6, 16
    assert sampling.decode_segments(N - 1) == ([15] if segment_min is None else [5, 10, 15])
    p = sampling.SamplingParams(max_new_tokens=N, temperature=1.0)
    ids, mask = jnp.ones((B, P), jnp.int32), jnp.ones((B, P), bool)
    hlo = jax.jit(lambda pr: sampling.sample(model, pr, ids, mask, jax.random.key(0), p)).lower(
        params).compile().as_text()
    with_trips, _, unknown = hlo_matmul_flops(hlo)
    ends = sampling.decode_segments(N - 1)
    # each loop carries its most trips in its name, for a compiler that records no trip count
    named = [re.search(r"/at_most_(\d+)_trips/while\"", line) for line in hlo.splitlines() if " while(" in line]
    assert sorted(int(m.group(1)) for m in named if m) == [end - start for start, end in zip([0] + ends, ends)]
    D, F, V, H, K, G = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim, cfg.n_kv_heads, cfg.q_per_kv
    layers = 2 * cfg.n_layers * (D * K * (G + 2) * H + K * G * H * D + D * 2 * F + F * D)  # FLOPs per token
    head = 2 * D * V
    attention = lambda queries, slots: 4 * B * queries * K * G * H * slots * cfg.n_layers  # scores and values
    want = B * P * layers + B * head + attention(P, P + ends[0])  # the prefill, its head on the last position
    want += sum((end - start) * (B * (layers + head) + attention(1, P + end)) for start, end in zip([0] + ends, ends))
    assert unknown == 0 and with_trips == want, (with_trips, want)


def test_a_pipeline_steps_reference_pass_that_does_not_fit_names_the_overrides_to_pass(monkeypatch, tmp_path):
    from rlhf_jax.plan import planner as planner_mod
    from rlhf_jax.plan.devices import Budget
    from rlhf_jax.plan.figures import Footprint

    monkeypatch.setattr(planner_mod, "measure", lambda lowered, mesh: Measured(Footprint(0, 0, 100, 0, 0), 0.0, ""))
    cfg = load_config(None, ["stage=dpo", "data.name=r", "dpo.precompute_reference=true", f"run_dir={tmp_path}"])
    step = pipeline.Step("round2/dpo", cfg)
    planner = Planner([step], Budget(120, "", {}, ""), is_pipeline=True)
    plan_ = planner.plan(planner_mod.Program(step, lambda c: None, "b", [], [], sharding.mesh_from_config(cfg.mesh),
                                             before=lambda c: (None, 50, 16)))
    assert plan_.fits is False and plan_.lines[-1] == (
        "the reference pass does not fit: needs 150 B of 120 B per device; lower pipeline.dpo.train.eval_batch_size "
        "(now 16) or set pipeline.dpo.dpo.precompute_reference=false")


def test_the_verdict_at_the_memory_and_the_least_of_the_candidates_that_do_not_fit(monkeypatch, tmp_path):
    """A step needing exactly the device memory fits; one that fits no candidate names the least it found, and
    arguments that fill the memory exactly still leave the candidates to try."""
    from rlhf_jax.plan import planner as planner_mod
    from rlhf_jax.plan.devices import Budget
    from rlhf_jax.plan.figures import Footprint

    totals = {("none", 1): 400, ("none", 2): 300, ("block", 1): 250, ("block", 2): 280}  # the search's candidates
    arguments = {"value": 100}
    monkeypatch.setattr(planner_mod, "measure", lambda setting, mesh: Measured(
        Footprint(arguments["value"], 0, totals[setting] - arguments["value"], 0, 0), 0.0, ""))
    cfg = load_config(None, [*SFT, "train.batch_size=16", f"run_dir={tmp_path}"])
    step = pipeline.Step("sft", cfg)
    program = planner_mod.Program(step, lambda c: (c.model.remat, c.optim.grad_accum_steps), "b", [], [],
                                  sharding.mesh_from_config(cfg.mesh))
    verdict = lambda memory: Planner([step], Budget(memory, "", {}, ""), False).plan(program)
    assert verdict(400).fits is True and verdict(399).fits is False
    line = verdict(200).lines[-1]
    assert line == ("does not fit: needs 400 B of 200 B per device; no micro-batch fits, with or without "
                    "model.remat=block (the least: 250 B with accumulation 1, remat block; params, optimizer state, "
                    "frozen models and batch take 100 B): lower data.max_prompt_tokens, data.max_response_tokens, "
                    "split the weights over more devices (mesh.shape: a larger fsdp axis), or train LoRA adapters "
                    "(lora.rank)"), line
    ppo = pipeline.Step("round1/ppo", load_config(None, ["stage=ppo", "data.name=p", "lora.rank=8",
                                                         f"run_dir={tmp_path}"]))
    rloo = pipeline.Step("rloo", load_config(None, ["stage=rloo", "data.name=p", "rloo.reward_function=m:f",
                                                    f"run_dir={tmp_path}"]))
    for step, prefix in ((ppo, "pipeline.ppo."), (rloo, "")):  # the rollout's batch and length shrink it
        assert Planner([step], Budget(200, "", {}, ""), bool(prefix))._what_shrinks(step) == (
            f"lower {prefix}train.batch_size, {prefix}data.max_prompt_tokens, {prefix}sampling.max_new_tokens, split "
            f"the weights over more devices ({prefix}mesh.shape: a larger fsdp axis)"
            + ("" if step is ppo else ", or train LoRA adapters (lora.rank)"))
    arguments["value"] = 200  # the arguments alone fill it: the search still runs (a smaller micro-batch may fit)
    assert "no micro-batch fits" in verdict(200).lines[-1]
    arguments["value"] = 201
    assert "nothing fits: its arguments and outputs alone" in verdict(200).lines[-1]


def test_rows_per_device_of_a_micro_batch_count_each_stages_own_rows():
    from rlhf_jax.plan.planner import micro_rows

    mesh = sharding.mesh_from_config(load_config(None, []).mesh)  # 8 data-parallel devices
    rows = lambda *o: micro_rows(load_config(None, o), mesh)
    assert rows("stage=sft", "train.batch_size=32", "optim.grad_accum_steps=2") == 2
    assert rows("stage=ppo", "train.batch_size=32", "ppo.minibatches=2") == 2
    assert rows("stage=grpo", "train.batch_size=8", "grpo.group_size=4", "grpo.minibatches=2") == 2  # 32 responses
    assert rows("stage=rloo", "train.batch_size=8", "rloo.group_size=4", "rloo.minibatches=1") == 4
