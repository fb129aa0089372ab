"""Episodes/s of one whole PPO iteration (rollout, scoring, advantages, update), its rollout / update split and its
share of the FLOP bound, side by side with Google Tunix's PPOLearner on the same shapes.

  python benchmarks/ppo.py --out benchmarks/results/ppo_cpu.json

The tiny Llama of the decode benchmark (vocab 2048, d 256, 4 layers, 4 heads, 2 KV heads, MLP 688) as policy,
reference, value and reward model; 16 prompts of 64 tokens, 64 new tokens, 1 epoch, 1 minibatch, float32. With
`--shape smollm2-135m`: SmolLM2-135M's architecture (vocab 49152, d 576, 30 layers; its head untied) with random
weights, 8 prompts of 128 tokens, 64 new tokens, the largest real shape this 2-core, 24 GiB machine runs with
Tunix beside it. With `--shape qwen2.5-0.5b`: Qwen2.5-0.5B's architecture with random weights, 64 prompts of 256
tokens, 128 new tokens, bfloat16 compute on accelerators (Tunix, whose Llama3 has no biases, is then skipped);
`--compile-only` reports its compile time and XLA's planned memory per device without running it (what a CPU can
do at that size). `peak_rss_gib` is each process's most resident memory (the host's, on CPU the models'). FLOPs
come from XLA's cost analysis. The share of the FLOP bound counts an episode's nominal FLOPs (sampling, four
teacher-forced passes, the update's forward and backward: `ppo.rollout` and `ppo.update` compiled alone);
the iteration executes fewer, since the update reuses the rollout's forward of its first micro-batch
(`executed_fraction_of_peak` counts those). The peak is a 2048^3 float32 matmul measured in the same run, round
by round. The timed iteration is the stage's own program (`ppo.iteration`, lap clock included): `rollout_s`
(sampling, old / reference log-probs, values, scores, GAE) and `update_s` (the optimizer steps) are its laps,
each with its share of the peak (the rollout's FLOPs from `ppo.rollout` compiled alone, the update's the rest).

Tunix runs in its own environment, `.venv-tunix` (it pins its own dependencies; rlhf_jax is not installed
there), created once from the repository root with:

  python3 -m venv .venv-tunix
  .venv-tunix/bin/pip install "google-tunix==0.1.7"
  # or, every dependency pinned as measured (jax 0.10.2, flax 0.12.8, optax 0.2.8, as in requirements.txt):
  .venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt

`--tunix-python` (default `.venv-tunix/bin/python` when it exists; otherwise Tunix is skipped with a note in
the JSON) runs benchmarks/tunix_ppo.py in that interpreter as one subprocess, built and compiled once, before any
timing. Then, `--rounds` times: `--iterations` of our whole iteration, as many of Tunix's learner (this process
waiting), then our rollout, update and the matmul peak; so load on the machine falls on both sides alike. Each
side releases the memory it holds freed once its measurement is done (benchmarks/heap.py) and starts the next
with an untimed iteration.
Every reported time is the median over the rounds; every per-round value is kept under "round_results".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax.config import OptimSection  # noqa: E402
from rlhf_jax.models.sampling import SamplingParams  # noqa: E402
from rlhf_jax.models.transformer import PAD_ID, ModelConfig, init_params, make_model  # noqa: E402
from rlhf_jax.plan.flops import flops_per_device  # noqa: E402
from rlhf_jax.rl import ppo  # noqa: E402
from rlhf_jax.runtime.clock import LapClock  # noqa: E402
from rlhf_jax.training import steps  # noqa: E402

from heap import release_freed_memory  # noqa: E402  benchmarks/heap.py
from report import emit, measured_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def flops_of(compiled) -> float:
    """FLOPs of one call on one device, with the matmuls of every loop (layers, chunks, minibatches) counted once per
    trip, and a loop that may stop early (the sampler's decode) at its most trips: XLA's cost analysis alone
    counts each loop body once."""
    return flops_per_device(compiled)[0]


def timed_iterations(step, state, inputs, iterations: int):
    """(seconds per iteration, state, metrics of each) of `iterations` calls of the iteration, after one untimed."""
    state, metrics = step(state, *inputs)
    jax.block_until_ready(metrics)
    every = []
    t0 = time.perf_counter()
    for _ in range(iterations):
        state, metrics = step(state, *inputs)
        every.append(metrics)
    jax.block_until_ready(every)
    return (time.perf_counter() - t0) / iterations, state, every


class Peer:
    """A peer's benchmark script run with --serve in its own interpreter (benchmarks/tunix_ppo.py,
    tunix_grpo.py, trl_dpo.py): built and warmed up once (the constructor waits for it), then `run(k)` times k of
    its iterations there while this process waits, and returns its JSON line. `env`: its environment (default:
    this process's)."""

    def __init__(self, python: str, script: str, args: list[str], env: dict | None = None):
        self.log = tempfile.TemporaryFile("w+")
        self.script = script
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / script), "--serve", *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.warmup = self._result()  # the warm-up (compilation), before any timing here

    def run(self, iterations: int) -> dict:
        """Its JSON line for `iterations` timed there, with `cpu_s`: the CPU seconds (user and system, every
        thread) its process spent meanwhile."""
        cpu0 = self.cpu_seconds()
        self.proc.stdin.write(f"{iterations}\n")
        self.proc.stdin.flush()
        result = self._result()
        return {**result, "cpu_s": self.cpu_seconds() - cpu0, "peak_rss_gib": self.peak_rss_gib()}

    def peak_rss_gib(self) -> float:
        """The most memory its process has held resident so far (Linux /proc; NaN elsewhere)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
        return float("nan") if kib is None else round(kib / 2**20, 2)

    def cpu_seconds(self) -> float:
        """User and system CPU seconds of the peer's process so far (Linux /proc; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        raise RuntimeError(f"{self.script} ended ({self.proc.wait()}): {self.log.read()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # ends its training loop
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# SmolLM2-135M's architecture (its head tied to the embedding): the real shape the CPU benchmarks run.
SMOLLM2_135M = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           head_dim=64, d_ff=1536, max_position_embeddings=8192, rope_theta=1e5, tie_embeddings=True,
                           eos_token_ids=(), bos_token_id=0)
# The benchmark's model shapes: `tiny` (the decode benchmark's Llama) and Qwen2.5-0.5B's architecture (random
# weights), with their prompts: (config, batch, prompt tokens, new tokens).
SHAPES = {
    "tiny": (ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                         head_dim=64, d_ff=688, max_position_embeddings=512, eos_token_ids=(1,)), 16, 64, 64),
    "qwen2.5-0.5b": (ModelConfig(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                                 n_kv_heads=2, head_dim=64, d_ff=4864, max_position_embeddings=32768, norm_eps=1e-6,
                                 rope_theta=1e6, qkv_bias=True, tie_embeddings=True, eos_token_ids=(1,)), 64, 256, 128),
    # A real model's architecture that both sides can run on this CPU, Tunix included (a Llama). Its head is
    # untied, as Tunix's critic replaces an `lm_head`; the FLOPs are the same.
    "smollm2-135m": (dataclasses.replace(SMOLLM2_135M, tie_embeddings=False, eos_token_ids=(1,)), 8, 128, 64),
}


def tunix_llama3_fields(cfg: ModelConfig) -> dict:
    """`cfg` as the fields of Tunix's llama3.ModelConfig (benchmarks/tunix_*.py take them as JSON)."""
    return {"num_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "embed_dim": cfg.d_model,
            "hidden_dim": cfg.d_ff, "num_heads": cfg.n_heads, "head_dim": cfg.head_dim,
            "num_kv_heads": cfg.n_kv_heads, "rope_theta": int(cfg.rope_theta), "norm_eps": cfg.norm_eps,
            "weight_tying": cfg.tie_embeddings}


def tunix_model(cfg: ModelConfig, B: int, P: int, N: int) -> str:
    """The shape as benchmarks/tunix_ppo.py's --shape reads it (JSON), for Tunix's own Llama3."""
    return json.dumps({**tunix_llama3_fields(cfg), "batch": B, "prompt": P, "new_tokens": N})


def memory_per_device(compiled) -> dict:
    """GiB per device: XLA's plan for the program (arguments, temporaries) and, on accelerators, the peak the
    device has seen so far."""
    gib = lambda n: round(n / 2**30, 3)
    plan = compiled.memory_analysis()
    out = {"arguments_gib": gib(plan.argument_size_in_bytes), "temporaries_gib": gib(plan.temp_size_in_bytes)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = gib(stats["peak_bytes_in_use"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="model and prompt shapes (qwen2.5-0.5b: 64 prompts of 256 tokens, 128 new tokens)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="",
                    help="compute dtype (default: bfloat16 on accelerators at qwen2.5-0.5b, else float32)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile and report compile time and planned memory; run nothing (sizes a CPU cannot run)")
    ap.add_argument("--layers", type=int, default=0, help="the shape's model with this many layers (0: its own)")
    ap.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto",
                    help="the layers as one scan (auto: above 8 layers, as model.scan_layers does)")
    ap.add_argument("--out", default="")
    ap.add_argument("--iterations", type=int, default=5, help="timed calls of each program per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of our measurement and Tunix's")
    default_tunix = ROOT / ".venv-tunix" / "bin" / "python"
    ap.add_argument("--tunix-python", default=str(default_tunix) if default_tunix.exists() else "",
                    help="interpreter of the Tunix environment ('' skips Tunix)")
    ap.add_argument("--tunix-warmup", type=int, default=2, help="untimed Tunix iterations (compilation)")
    args = ap.parse_args()
    cfg, B, P, N = SHAPES[args.shape]
    cfg = dataclasses.replace(cfg, n_layers=args.layers or cfg.n_layers)
    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    on_accelerator = jax.devices()[0].platform != "cpu"
    dtype = args.dtype or ("bfloat16" if on_accelerator and args.shape != "tiny" else "float32")
    optim = OptimSection(lr=1e-5, schedule="constant")
    model = lambda head="lm": make_model(cfg, head, dtype=dtype, scan_layers=scan)
    models = ppo.PPOModels(policy=model(), value=model("scalar"), reward=model("scalar"),
                           policy_opt=steps.make_optimizer(optim, 100), value_opt=steps.make_optimizer(optim, 100),
                           sampling=SamplingParams(N, temperature=1.0, eos_ids=(1,), pad_id=PAD_ID))
    settings = ppo.PPOSettings(epochs=1, minibatches=1)
    if args.compile_only:  # abstract arguments: nothing is allocated
        policy = jax.eval_shape(lambda: init_params(models.policy, jax.random.key(0)))
        reward = jax.eval_shape(lambda: init_params(models.reward, jax.random.key(1)))
        state = jax.eval_shape(lambda: ppo.init_state(init_params(models.policy, jax.random.key(0)),
                                                      init_params(models.reward, jax.random.key(1)), models,
                                                      settings, jax.random.PRNGKey(2)))
        frozen = ppo.Frozen(policy, reward)
    else:
        policy = init_params(models.policy, jax.random.key(0))
        reward = init_params(models.reward, jax.random.key(1))
        state = ppo.init_state(policy, reward, models, settings, jax.random.PRNGKey(2))
        frozen = ppo.Frozen(jax.tree.map(jnp.copy, policy), jax.tree.map(jnp.copy, reward))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (B, P)), jnp.int32)
    mask = jnp.ones((B, P), bool)
    rng = jax.random.PRNGKey(3)
    orders = ppo.minibatch_orders(jax.random.PRNGKey(4), B, settings)

    # The whole iteration as the stage runs it (one program, with the lap clock that times its rollout and its
    # update from inside). The rollout alone is compiled for its FLOPs (the update's are the rest of the
    # iteration's), and the update alone, with its own forward of the first minibatch, for an episode's nominal
    # FLOPs: sampling, four teacher-forced passes, and the update's forward and backward.
    runtime = ppo.Runtime(clock=LapClock())
    t0 = time.perf_counter()
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, models=models, settings=settings, runtime=runtime),
                   donate_argnums=0).lower(state, frozen, ids, mask).compile()
    compile_s = time.perf_counter() - t0
    shape = {"shape": args.shape, "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "batch": B,
             "prompt": P, "new_tokens": N, "dtype": dtype, "layers": cfg.n_layers,
             "scan_layers": models.policy.scan_layers, "compile_s": round(compile_s, 1),
             "memory_per_device": memory_per_device(step)}
    if args.compile_only:
        result = {**shape, "gflop_executed_per_iteration": round(flops_of(step) / 1e9, 2)}
        emit(result, args.out)
        return
    rollout = jax.jit(lambda s, f, i, m, r, o: ppo.rollout(s, f, i, m, r, models, settings, first_order_MMb=o)[:3]
                      ).lower(state, frozen, ids, mask, rng, orders[0]).compile()
    batch = rollout(state, frozen, ids, mask, rng, orders[0])[0]
    update = jax.jit(lambda s, b, o: ppo.update(s, b, o, models, settings)).lower(state, batch, orders).compile()
    # Responses run to the end here (random weights rarely draw EOS): the decode loop's N - 1 steps all run.
    flops = {"iteration": flops_of(step), "rollout": flops_of(rollout)}
    flops["update"] = flops["iteration"] - flops["rollout"]
    flops["nominal"] = flops["rollout"] + flops_of(update)

    # Tunix's Llama3 has no biases: Qwen2.5's shape runs on our side only.
    tunix_python = args.tunix_python if cfg.family == "llama" else ""
    tunix_note = "" if tunix_python else (
        "Tunix skipped: its learner is timed at Llama shapes only" if cfg.family != "llama" else
        "Tunix skipped: --tunix-python ''" if default_tunix.exists() else
        f"Tunix skipped: no {default_tunix.relative_to(ROOT)} (see the docstring of benchmarks/ppo.py to create it)")
    if tunix_python and not Path(tunix_python).exists():
        tunix_note, tunix_python = f"Tunix skipped: {tunix_python} does not exist", ""

    load_before = os.getloadavg()
    release_freed_memory()  # the compilations' peak, before the peer compiles
    tunix = None
    if tunix_python:
        try:
            tunix = Peer(tunix_python, "tunix_ppo.py", ["--warmup", str(args.tunix_warmup),
                                                         "--shape", tunix_model(cfg, B, P, N)])
        except RuntimeError as e:
            tunix_note = f"Tunix failed: {e}"
    rounds = []
    try:
        for r in range(args.rounds):
            # The two whole iterations back to back (what the speedup compares), then the peak.
            row = {}
            row["iteration_s"], state, laps = timed_iterations(step, state, (frozen, ids, mask), args.iterations)
            if tunix is not None:
                release_freed_memory()
                try:
                    tunix_result = tunix.run(args.iterations)
                    row["tunix_iteration_s"] = tunix_result["iteration_s"]
                except RuntimeError as e:
                    tunix_note, tunix = f"Tunix failed: {e}", None
            row["rollout_s"], row["update_s"] = (statistics.median(float(m[k]) for m in laps)
                                                 for k in ("rollout_s", "update_s"))
            row["matmul_peak_gflops"] = max(matmul_peak(8192 if on_accelerator else 2048, dtype=dtype)
                                            for _ in range(3)) / 1e9
            row = {k: round(v, 4) for k, v in row.items()}
            print(json.dumps({"round": r, **row}), file=sys.stderr)
            rounds.append(row)
    finally:
        if tunix is not None:
            tunix.close()

    med = lambda key: statistics.median(row[key] for row in rounds)
    # Shares of the FLOP bound and the speedup are taken round by round (against the matmul peak and the Tunix
    # time of the same round, measured next to ours under the same load), then the median over the rounds.
    share = lambda key, name: statistics.median(flops[name] / row[key] / (row["matmul_peak_gflops"] * 1e9)
                                                for row in rounds)
    seconds = med("iteration_s")
    shape["memory_per_device"] = memory_per_device(step)  # with the device's peak after running
    shape["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB
    result = {**shape, "epochs": 1, "minibatches": 1, "iterations": args.iterations,
              "rounds": args.rounds,
              "iteration_s": round(seconds, 4), "episodes_per_s": round(B / seconds, 2),
              "rollout_s": round(med("rollout_s"), 4), "update_s": round(med("update_s"), 4),
              "gflop_per_episode": round(flops["nominal"] / 1e9 / B, 3),
              "gflop_executed_per_iteration": round(flops["iteration"] / 1e9, 2),
              "gflop_rollout": round(flops["rollout"] / 1e9, 2), "gflop_update": round(flops["update"] / 1e9, 2),
              "achieved_gflops": round(flops["iteration"] / seconds / 1e9, 1),
              "matmul_peak_gflops": round(med("matmul_peak_gflops"), 1),
              "fraction_of_flop_bound": round(share("iteration_s", "nominal"), 3),
              "executed_fraction_of_peak": round(share("iteration_s", "iteration"), 3),
              "rollout_fraction_of_flop_bound": round(share("rollout_s", "rollout"), 3),
              "update_fraction_of_flop_bound": round(share("update_s", "update"), 3)}
    if all("tunix_iteration_s" in row for row in rounds):
        tunix_seconds = med("tunix_iteration_s")
        per_round = [row["tunix_iteration_s"] / row["iteration_s"] for row in rounds]
        result.update(tunix_iteration_s=round(tunix_seconds, 4), tunix_episodes_per_s=round(B / tunix_seconds, 2),
                      speedup_vs_tunix=round(statistics.median(per_round), 2),
                      speedup_vs_tunix_per_round=[round(x, 2) for x in per_round],
                      tunix={k: v for k, v in tunix_result.items() if k not in ("iteration_s", "episodes_per_s")})
    else:
        result["tunix_note"] = tunix_note
    # The machine's 1-minute load average before and after: above the core count, other work was running.
    result["loadavg_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    result["env"] = measured_env()
    result["round_results"] = rounds
    emit(result, args.out)


if __name__ == "__main__":
    main()
