"""Episodes/s of Google Tunix's PPOLearner on the shapes of benchmarks/ppo.py, for a side-by-side comparison.

Runs in its own environment (see benchmarks/requirements-tunix.txt), never imports rlhf_jax:

  python3 -m venv .venv-tunix && .venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt
  .venv-tunix/bin/python benchmarks/tunix_ppo.py --warmup 2 --iterations 5

Tunix's own Llama3 (tunix.models.llama3) with the tiny config of benchmarks/ppo.py: vocab 2048, d 256, 4 layers, 4
heads of 64, 2 KV heads, MLP 688, untied embeddings, float32 (`--shape`: another of its Llama shapes, as JSON).
Actor and reference are two copies of one initialisation; the critic is `tunix.rl.utils.create_critic_model(actor)`
(the backbone with a scalar head) and the reward model the same construction from another initialisation. 16 prompts
of 64 tokens (no BOS, so exactly 64), 64 new tokens at temperature 1 with EOS id 1, PPO with 1 epoch
(num_iterations=1) over one minibatch of 16, KL beta 0.02 with the k1 estimator, gamma 1, lambda 0.95, clip 0.2 on
ratio and value, and for both models AdamW (lr 1e-5, b1 0.9, b2 0.95) after global-norm clipping at 1: the settings
of benchmarks/ppo.py. The vanilla rollout engine; every role on one mesh over the default devices.

An iteration is one global step of PPOLearner.train (generation, reference / old log-probs, values, reward
scores, GAE, one actor and one critic update). One `train` call runs every measurement: its dataset iterator
hands out the batches, and between measurements waits for the parameters of both trained models to be computed
and reads the clock. The first `--warmup` iterations (compilation) are not reported; then `--iterations` are
timed and one JSON line printed. With `--serve` (how benchmarks/ppo.py drives it, alternating with its own
measurement) the script prints a JSON line once warm, then reads a number k per line of stdin, times k
iterations and prints one JSON line for them, until it reads 0 or stdin ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType

from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils as rl_utils
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout

from heap import release_freed_memory  # benchmarks/heap.py

PAD, EOS = 0, 1
# benchmarks/ppo.py's tiny shape; it passes its other Llama shapes (smollm2-135m) the same way.
TINY = {"num_layers": 4, "vocab_size": 2048, "embed_dim": 256, "hidden_dim": 688, "num_heads": 4, "head_dim": 64,
        "num_kv_heads": 2, "rope_theta": 10000, "norm_eps": 1e-5, "weight_tying": False,
        "batch": 16, "prompt": 64, "new_tokens": 64}


class IdTokenizer:
    """Text is token ids written as decimal numbers separated by spaces; bos_id 0 is falsy, so none is added."""

    def __init__(self, pad: int = PAD, eos: int = EOS):
        self.pad, self.eos = pad, eos

    def encode(self, text, **_):
        return [int(t) for t in str(text).split()]

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return 0

    def eos_id(self):
        return self.eos

    def pad_id(self):
        return self.pad


class Llama3(llama3.Llama3):
    """Tunix's Llama3, taking (and ignoring) the `segment_ids` keyword that the critic / reward scoring passes;
    the attention mask it also passes already carries the padding."""

    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
        return super().__call__(input_tokens, positions, cache, attention_mask)


class Batches:
    """The same batch of prompts, in measurements of `commands` iterations each (ending at 0): before and after
    each, waits on `ready()` and reads the clock, handing the seconds to `report(iterations, seconds)`. Each
    measurement after the first starts with one untimed iteration, and each ends by releasing the memory the
    process holds freed (benchmarks/heap.py), which benchmarks/ppo.py measures meanwhile."""

    def __init__(self, prompts: np.ndarray, commands, ready, report):
        self.prompts, self.commands, self.ready, self.report = prompts, commands, ready, report

    def __iter__(self):
        # PPOLearner.train takes the first batch before its first iteration, and every later one when the
        # iteration that uses it starts: the request after a measurement's last batch comes once it is done.
        for i, k in enumerate(self.commands):
            if k <= 0:
                return
            if i:  # the pages released after the last measurement come back here, untimed
                yield {"prompts": self.prompts}
            self.ready()
            t0 = time.perf_counter()
            for _ in range(k):
                yield {"prompts": self.prompts}
            self.ready()
            self.report(k, time.perf_counter() - t0)
            release_freed_memory()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5, help="timed PPO iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first iterations (compilation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="time k iterations per number k read from stdin")
    ap.add_argument("--shape", default=json.dumps(TINY),
                    help="JSON: llama3.ModelConfig's fields, batch, prompt and new_tokens (default: the tiny shape)")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the compilation)")
    fields = json.loads(args.shape)
    B, P, N = (fields.pop(k) for k in ("batch", "prompt", "new_tokens"))
    cfg = llama3.ModelConfig(**fields)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices), 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        actor = Llama3(cfg, rngs=nnx.Rngs(args.seed))
        reference = Llama3(cfg, rngs=nnx.Rngs(args.seed))
        critic = rl_utils.create_critic_model(actor, seed=args.seed + 1)
        reward = rl_utils.create_critic_model(Llama3(cfg, rngs=nnx.Rngs(args.seed + 2)), seed=args.seed + 3)

    def optimizer():
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, b1=0.9, b2=0.95, eps=1e-8,
                                                                       weight_decay=0.0))

    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.CRITIC, rl_cluster_lib.Role.REFERENCE,
             rl_cluster_lib.Role.ROLLOUT, rl_cluster_lib.Role.REWARD)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in roles},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer(), critic_optimizer=optimizer(), eval_every_n_steps=10**9,
            max_steps=10**9, mini_batch_size=B, train_micro_batch_size=B, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N, temperature=1.0, top_p=1.0,
            top_k=None, eos_tokens=[EOS]),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=reference, reward=reward,
                                       tokenizer=IdTokenizer(), cluster_config=cluster_config)
    ppo_config = ppo_learner.PPOConfig(num_iterations=1, beta=0.02, kl_method="kl", gamma=1.0, gae_lambda=0.95,
                                       epsilon=0.2, clip_range_value=0.2, entropy_coef=None)
    learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=ppo_config)

    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, P))
    prompts = np.array([" ".join(map(str, row)) for row in ids])
    settings = {"framework": f"tunix {_version('google-tunix')}", "jax": jax.__version__,
                "device": devices[0].device_kind, "devices": len(devices), "model": fields, "batch": B, "prompt": P,
                "new_tokens": N,
                "epochs": 1, "minibatches": 1, "dtype": "float32", "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def ready():
        jax.block_until_ready((nnx.state(cluster.actor_trainer.model), nnx.state(cluster.critic_trainer.model)))

    measurements = []

    def report(k: int, seconds: float):
        warmup = not measurements
        if args.serve or not warmup:  # --serve says when the warm-up is done
            print(json.dumps({**settings, "iterations": k, **({"warmup": True} if warmup else {}),
                              "iteration_s": round(seconds / k, 4), "episodes_per_s": round(B * k / seconds, 2),
                              "completion_mean_length": _mean_length(cluster)}), flush=True)
        measurements.append(seconds)

    if args.serve:
        commands = itertools.chain([args.warmup], (int(line) for line in sys.stdin))
    else:
        commands = [args.warmup, args.iterations, 0]
    learner.train(Batches(prompts, commands, ready, report))


def _mean_length(cluster) -> float | None:
    """The mean completion length the learner logged so far (under 64 where a row drew EOS)."""
    try:
        for modes in cluster._rl_metrics_logger._metrics.values():  # pylint: disable=protected-access
            for name, values in modes.get("train", {}).items():
                if name.endswith("completions/mean_length"):
                    return round(float(np.mean(values)), 2)
    except (AttributeError, TypeError):
        pass
    return None


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
