"""Episodes/s of Google Tunix's GRPOLearner on the shapes of benchmarks/grpo.py, for a side-by-side comparison.

Runs in its own environment (see benchmarks/requirements-tunix.txt), never imports rlhf_jax:

  python3 -m venv .venv-tunix && .venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt
  .venv-tunix/bin/python benchmarks/tunix_grpo.py --warmup 2 --iterations 5

Tunix's own Llama3 (tunix.models.llama3) with the tiny config of benchmarks/grpo.py: vocab 2048, d 256, 4 layers, 4
heads of 64, 2 KV heads, MLP 688, untied embeddings, float32 (`--shape`: another Llama shape of benchmarks/ppo.py,
as JSON, with its prompt and response lengths). Actor and reference are two copies of one initialisation; no critic
and no reward model: the reward function `even_token_share` (the share of a response's tokens that are even numbers,
on the decoded text; the same function as benchmarks/grpo.py) scores the responses. `--prompts` prompts of 64 tokens
(no BOS, so exactly 64), `--group` responses each of 64 new tokens at temperature 1 with EOS id 1; GRPO with 1 epoch
(num_iterations=1) over one minibatch of every prompt, KL beta 0.04 with the k3 estimator (`low_var_kl`) as a loss
term, clip 0.2, advantages scaled by the group's std, loss averaged per sequence then over sequences
(`sequence-mean-token-mean`), AdamW (lr 1e-5, b1 0.9, b2 0.95) after global-norm clipping at 1: the settings of
benchmarks/grpo.py. The vanilla rollout engine; every role on one mesh over the default devices.

An iteration is one global step of GRPOLearner.train (generation, reference log-probs, rewards, advantages, one
actor update). As benchmarks/tunix_ppo.py: one `train` call runs every measurement, its dataset iterator hands out
the batches and, between measurements, waits for the actor's parameters to be computed and reads the clock. The
first `--warmup` iterations (compilation) are not reported; then `--iterations` are timed and one JSON line
printed. With `--serve` (how benchmarks/grpo.py drives it, alternating with its own measurement) the script prints
a JSON line once warm, then reads a number k per line of stdin, times k iterations and prints one JSON line for
them, until it reads 0 or stdin ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType

from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

from tunix_ppo import TINY, Batches, IdTokenizer, Llama3, _version  # the PPO comparison's pieces

PAD, EOS = 0, 1


def even_token_share(prompts, completions, **_):
    """The reward of each response: the share of its tokens (decimal ids separated by spaces, EOS excluded) that are
    even; 0 for an empty response. A cheap Python function of the decoded text, as a verifier would be."""
    rewards = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        rewards.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return rewards


def mean_length(cluster) -> float | None:
    """The mean completion length the learner logged so far (under 64 where a row drew EOS); its metrics logger
    keeps "completions/mean_length" under the prefix "completions"."""
    try:
        for prefix, modes in cluster._rl_metrics_logger._metrics.items():  # pylint: disable=protected-access
            for name, values in modes.get("train", {}).items():
                if f"{prefix}/{name}".endswith("completions/mean_length"):
                    return round(float(np.mean(values)), 2)
    except (AttributeError, TypeError):
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5, help="timed GRPO iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first iterations (compilation)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="responses per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="time k iterations per number k read from stdin")
    ap.add_argument("--shape", default=json.dumps(TINY),
                    help="JSON: llama3.ModelConfig's fields, prompt and new_tokens (default: the tiny shape)")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the compilation)")
    fields = json.loads(args.shape)
    fields.pop("batch", None)  # --prompts and --group say it
    B, G, P, N = args.prompts, args.group, fields.pop("prompt"), fields.pop("new_tokens")
    cfg = llama3.ModelConfig(**fields)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices), 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        actor = Llama3(cfg, rngs=nnx.Rngs(args.seed))
        reference = Llama3(cfg, rngs=nnx.Rngs(args.seed))

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, b1=0.9, b2=0.95, eps=1e-8,
                                                                        weight_decay=0.0))
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in roles},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=10**9, mini_batch_size=B,
            train_micro_batch_size=B, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N, temperature=1.0, top_p=1.0,
            top_k=None, eos_tokens=[EOS]),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=IdTokenizer(),
                                       cluster_config=cluster_config)
    grpo_config = grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=0.04, kl_loss_mode="low_var_kl",
                                          epsilon=0.2, loss_agg_mode="sequence-mean-token-mean")
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_config, reward_fns=even_token_share)

    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, P))
    prompts = np.array([" ".join(map(str, row)) for row in ids])
    settings = {"framework": f"tunix {_version('google-tunix')}", "jax": jax.__version__,
                "device": devices[0].device_kind, "devices": len(devices), "model": fields, "prompts": B, "group": G,
                "prompt": P,
                "new_tokens": N, "epochs": 1, "minibatches": 1, "dtype": "float32",
                "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def ready():
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model))

    measurements = []

    def report(k: int, seconds: float):
        warmup = not measurements
        if args.serve or not warmup:  # --serve says when the warm-up is done
            print(json.dumps({**settings, "iterations": k, **({"warmup": True} if warmup else {}),
                              "iteration_s": round(seconds / k, 4), "episodes_per_s": round(B * G * k / seconds, 2),
                              "completion_mean_length": mean_length(cluster)}), flush=True)
        measurements.append(seconds)

    if args.serve:
        commands = itertools.chain([args.warmup], (int(line) for line in sys.stdin))
    else:
        commands = [args.warmup, args.iterations, 0]
    learner.train(Batches(prompts, commands, ready, report))


if __name__ == "__main__":
    main()
