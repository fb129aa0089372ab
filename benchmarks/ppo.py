"""Episodes/s of one whole PPO iteration (rollout, scoring, advantages, update) and its share of the FLOP bound.

  python benchmarks/ppo.py --out benchmarks/results/ppo_cpu.json

The tiny Llama of the decode benchmark (vocab 2048, d 256, 4 layers, 4 heads, 2 KV heads, MLP 688) as policy,
reference, value and reward model; 16 prompts of 64 tokens, 64 new tokens, 1 epoch, 1 minibatch, float32. The
FLOPs of an iteration come from XLA's cost analysis of the compiled program; the peak is a 2048^3 float32
matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ppo, steps
from rlhf_jax.config import OptimSection, PPOSection
from rlhf_jax.model import PAD_ID, ModelConfig, init_params, make_model
from rlhf_jax.sampling import SamplingParams


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--iterations", type=int, default=5)
    args = ap.parse_args()
    cfg = ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      head_dim=64, d_ff=688, max_position_embeddings=512, eos_token_ids=(1,))
    B, P, N = 16, 64, 64
    optim = OptimSection(lr=1e-5, schedule="constant")
    models = ppo.PPOModels(policy=make_model(cfg), value=make_model(cfg, "scalar"), reward=make_model(cfg, "scalar"),
                           policy_opt=steps.make_optimizer(optim, 100), value_opt=steps.make_optimizer(optim, 100),
                           sampling=SamplingParams(N, temperature=1.0, eos_ids=(1,), pad_id=PAD_ID),
                           ppo=PPOSection(epochs=1, minibatches=1))
    policy = init_params(models.policy, jax.random.key(0))
    reward = init_params(models.reward, jax.random.key(1))
    state = ppo.init_state(policy, reward, models, jax.random.PRNGKey(2))
    frozen = ppo.Frozen(jax.tree.map(jnp.copy, policy), jax.tree.map(jnp.copy, reward))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (B, P)), jnp.int32)
    mask = jnp.ones((B, P), bool)
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, models=models), donate_argnums=0)
    compiled = step.lower(state, frozen, ids, mask).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    state, metrics = step(state, frozen, ids, mask)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        state, metrics = step(state, frozen, ids, mask)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / args.iterations
    peak = matmul_peak()
    result = {"device": jax.devices()[0].device_kind, "batch": B, "prompt": P, "new_tokens": N,
              "iteration_s": round(seconds, 4), "episodes_per_s": round(B / seconds, 2),
              "gflop_per_iteration": round(flops / 1e9, 2), "gflop_per_episode": round(flops / 1e9 / B, 3),
              "achieved_gflops": round(flops / seconds / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
              "fraction_of_flop_bound": round(flops / seconds / peak, 3)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
