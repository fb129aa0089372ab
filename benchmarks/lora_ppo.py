"""Full fine-tuning against LoRA in one PPO iteration: memory per device (XLA's buffer assignment of the compiled
program: arguments, outputs, temporaries) and seconds per iteration, side by side in one run.

  python benchmarks/lora_ppo.py --out benchmarks/results/lora_ppo_cpu.json

The model of benchmarks/ppo.py (a Llama of vocab 2048, d 256, 4 layers, 4 heads, 2 KV heads, MLP 688) as policy,
reward and value model; 16 prompts of 64 tokens, 64 new tokens, 1 epoch, 1 minibatch, float32. Both programs are
built as the ppo stage builds them (`stages.ppo.build_models`, `iteration_shardings`, `jit_iteration`): full
fine-tuning holds the policy twice (trained and reference), the value model and both optimizers' moments; LoRA
(`--rank`, every projection adapted) holds the policy's base once (also the reference), the reward model (also
the value model's base) and the adapters with their moments. `--rounds` times `--iterations` of each, alternating,
so load on the machine falls on both alike; times are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax.config import load_config  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model  # noqa: E402
from rlhf_jax.rl import ppo  # noqa: E402
from rlhf_jax.runtime import sharding  # noqa: E402
from rlhf_jax.runtime.clock import LapClock  # noqa: E402
from rlhf_jax.stages import ppo as ppo_stage  # noqa: E402
from rlhf_jax.stages.policy_common import rollout_sampling  # noqa: E402
from rlhf_jax.training.state import split_trainable, trained_model, with_head  # noqa: E402

from ppo import timed_iterations  # noqa: E402  benchmarks/ppo.py (this directory is on sys.path)
from report import emit  # noqa: E402

CFG = ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                  d_ff=688, max_position_embeddings=512, eos_token_ids=(1,))
B, P, N = 16, 64, 64


def program(rank: int, mesh):
    """(the jitted iteration, its state, frozen params, trainable parameter count) as the stage builds them."""
    cfg = load_config(None, ["stage=ppo", f"train.batch_size={B}", "ppo.minibatches=1", "ppo.epochs=1",
                             f"data.max_prompt_tokens={P}", f"sampling.max_new_tokens={N}", "ppo.reward_model=rm",
                             "ppo.samples_every=0", "optim.lr=1e-5", "optim.schedule=constant", f"lora.rank={rank}"])
    policy_model, value_model = trained_model(cfg, CFG, "lm"), trained_model(cfg, CFG, "scalar")
    models, settings = ppo_stage.build_models(cfg, policy_model, value_model, make_model(CFG, "scalar"), 100,
                                              rollout_sampling(cfg, (1,)))
    state_sh, frozen_sh = ppo_stage.iteration_shardings(cfg, models, mesh)
    base = init_params(make_model(CFG), jax.random.key(0))
    reward = with_head(base, CFG, "lm", "scalar", jax.random.key(1))

    def adapted(params, model, seed):
        if model.lora is None:
            return params
        return lora.with_adapters(params, lora.init_adapters(CFG, model.lora, jax.random.key(seed)))

    policy_params, policy_base = split_trainable(policy_model, adapted(base, policy_model, 2))
    value_params, value_base = split_trainable(value_model, adapted(reward, value_model, 3))
    state = jax.jit(lambda p, v: ppo.init_state(p, v, models, settings, jax.random.PRNGKey(4)),
                    out_shardings=state_sh)(policy_params, value_params)
    copy = lambda tree, sh: None if sh is None else sharding.place(jax.tree.map(np.asarray, tree), sh)
    reference = base if policy_model.lora is None else lora.also_trained(policy_params, policy_model.lora)
    frozen = ppo.Frozen(ref_params=copy(reference, frozen_sh.ref_params),
                        reward_params=copy(reward, frozen_sh.reward_params),
                        policy_base=copy(policy_base, frozen_sh.policy_base),
                        value_base=copy(value_base, frozen_sh.value_base))
    iteration = ppo_stage.jit_iteration(models, settings, state_sh, frozen_sh, mesh, LapClock())
    trainable = sum(x.size for x in jax.tree.leaves((state.policy.params, state.value.params)))
    return iteration, state, frozen, trainable


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    mib = lambda n: round(n / 2**20, 2)
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"arguments_mib": mib(m.argument_size_in_bytes), "outputs_mib": mib(m.output_size_in_bytes),
            "temporaries_mib": mib(m.temp_size_in_bytes), "aliased_mib": mib(m.alias_size_in_bytes),
            "total_mib": mib(total)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations of each program per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mesh = sharding.mesh_from_config(load_config(None).mesh)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, CFG.vocab_size, (B, P)), jnp.int32)
    mask = jnp.ones((B, P), bool)
    batch = {"ids": sharding.place(ids, sharding.batch_sharding(mesh)),
             "mask": sharding.place(mask, sharding.batch_sharding(mesh))}
    variants, figures = {}, {}
    for name, rank in (("full", 0), ("lora", args.rank)):
        iteration, state, frozen, trainable = program(rank, mesh)
        compiled = iteration.lower(state, frozen, batch["ids"], batch["mask"], None).compile()
        variants[name] = [compiled, state, frozen]
        figures[name] = {"lora_rank": rank, "trainable_params": trainable, **memory(compiled)}
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, v in variants.items():
            compiled, state, frozen = v
            row[f"{name}_iteration_s"], v[1], _ = timed_iterations(compiled, state, (frozen, batch["ids"],
                                                                                    batch["mask"], None),
                                                                  args.iterations)
        rounds.append({k: round(x, 4) for k, x in row.items()})
        print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr)
    for name in variants:
        figures[name]["iteration_s"] = round(statistics.median(row[f"{name}_iteration_s"] for row in rounds), 4)
        figures[name]["episodes_per_s"] = round(B / figures[name]["iteration_s"], 2)
    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "batch": B, "prompt": P,
              "new_tokens": N, "dtype": "float32", "model": {"d_model": CFG.d_model, "n_layers": CFG.n_layers,
                                                             "vocab": CFG.vocab_size},
              **figures,
              "memory_ratio_lora_to_full": round(figures["lora"]["total_mib"] / figures["full"]["total_mib"], 3),
              "time_ratio_lora_to_full": round(figures["lora"]["iteration_s"] / figures["full"]["iteration_s"], 3),
              "iterations": args.iterations, "rounds": args.rounds, "round_results": rounds,
              "loadavg_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}
    emit(result, args.out)


if __name__ == "__main__":
    main()
