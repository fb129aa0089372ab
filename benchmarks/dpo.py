"""Pairs/s of a DPO optimizer step on K = 4 rankings, side by side with TRL's DPOTrainer on the same shapes, and
the step's share of the FLOP bound.

  python benchmarks/dpo.py --out benchmarks/results/dpo_cpu.json

The tiny Llama of the other benchmarks (vocab 2048, d 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 688, float32)
as policy and frozen reference, from one initialisation. `--prompts` rankings per step (default 8), each of 4
responses ranked 0..3: its 6 ordered pairs, 48 per step. 64-token prompts, 64-token responses (63 random tokens
and EOS). The sigmoid loss with beta 0.1 and AdamW (lr 1e-5, b1 0.9, b2 0.95, no weight decay, global-norm clip 1,
constant learning rate).

Ours is the dpo stage's compiled train step (`rl.dpo.dpo_step`, jitted over the mesh by `training.state.jit_step`
with the state donated, the batch put on the mesh by `to_global` every step as the stage's loop does): ONE forward
and backward of the policy over the B x 4 [prompt | response] sequences and one forward of the reference over
them, whatever the number of pairs, each prompt's part run once for its 4 responses. The reference is live (an
argument of every step); the same step with `dpo.precompute_reference` (the batch carrying the reference's
log-probs, scored once before) is timed too.

TRL is pairwise: each pair is one dataset row (prompt, chosen, rejected), and one step of 48 rows runs the policy
forward and backward, and the reference forward, over 96 sequences of 128 tokens (benchmarks/trl_dpo.py; TRL's
defaults bf16 autocast and gradient checkpointing turned off, float32 as ours). It runs in its own environment,
created once from the repository root with:

  python3 -m venv .venv-trl
  .venv-trl/bin/pip install -r benchmarks/requirements-trl.txt   # trl and what it resolved to, torch 2.13.0 CPU

`--trl-python` (default `.venv-trl/bin/python` when it exists; otherwise TRL is skipped with a note in the JSON)
runs benchmarks/trl_dpo.py in that interpreter as one subprocess, on the weights of our initialisation (written
with `models.hf.save_hf`), warmed up once before any timing. Then, `--rounds` times: `--steps` of our live step,
as many of TRL's (this process waiting), as many of our precomputed-reference step, then a 2048^3 matmul peak; so
load on the machine falls on both sides alike. Every reported time is the median over the rounds; every
per-round value is kept under "round_results", with the CPU seconds each side's process spent per step (all its
threads) and the 1-minute load average. FLOPs come from XLA's cost analysis of our compiled steps. TRL's process
runs with glibc's malloc defaults, ours with the environment's (`make bench` sets MALLOC_* for XLA).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax.config import MeshSection, OptimSection  # noqa: E402
from rlhf_jax.data.rankings import pairs_from_ranks  # noqa: E402
from rlhf_jax.models import hf  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model  # noqa: E402
from rlhf_jax.rl import dpo  # noqa: E402
from rlhf_jax.runtime import sharding  # noqa: E402
from rlhf_jax.training import steps  # noqa: E402
from rlhf_jax.training.state import jit_step, place_state, state_shardings, to_global  # noqa: E402

# benchmarks/ppo.py and benchmarks/grpo.py (this script's folder is on the path): the measurement pieces
from grpo import own_cpu_seconds, peer_python  # noqa: E402
from ppo import ROOT, Peer, flops_of, matmul_peak  # noqa: E402
from report import emit, measured_env  # noqa: E402

EOS, K = 1, 4
# TRL runs with glibc's malloc defaults: the MALLOC_* settings `make bench` gives XLA (docs/performance.md) are
# ours, and PyTorch's training step measured no faster with them (benchmarks/results/train_cpu*.json).
TRL_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
TOTAL_STEPS = 1000  # the schedule's length: irrelevant for a constant learning rate


def ranking_batch(prompts: int, prompt_len: int, response_len: int, vocab_size: int, seed: int) -> dict:
    """A rankings batch as the data pipeline makes it: each prompt's 4 responses ranked 0 (best) .. 3, so
    pairs_BKK holds its 6 ordered pairs. The ids are benchmarks/trl_dpo.py's (same draws from the same seed), the
    EOS that TRL appends written here."""
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(2, vocab_size, (prompts, prompt_len)).astype(np.int32)
    drawn = rng.integers(2, vocab_size, (prompts, K, response_len - 1)).astype(np.int32)
    response_ids = np.concatenate([drawn, np.full((prompts, K, 1), EOS, np.int32)], axis=2)
    pairs = np.zeros((K, K), np.int32)
    pairs[pairs_from_ranks(np.arange(K))] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": np.ones((prompts, prompt_len), bool),
            "response_ids": response_ids, "response_mask": np.ones((prompts, K, response_len), bool),
            "pairs": np.broadcast_to(pairs, (prompts, K, K)).copy()}


class Stepper:
    """A jitted train step `(state, batch, rng, *frozen)`, compiled and warmed up on creation; `run(k)` takes k
    steps, the host batch put on the mesh each time, and returns the seconds per step."""

    def __init__(self, step, state, batch: dict, frozen: tuple, mesh):
        self.step, self.state, self.batch, self.frozen, self.mesh = step, state, batch, frozen, mesh
        self.rng = jax.random.key(0)
        self.compiled = step.lower(state, to_global(batch, mesh), self.rng, *frozen).compile()
        self.first_loss = float(self.run(1, metrics=True)["loss"])
        self.run(1)

    def run(self, k: int, metrics: bool = False):
        t0 = time.perf_counter()
        for _ in range(k):
            self.state, out = self.compiled(self.state, to_global(self.batch, self.mesh), self.rng, *self.frozen)
        jax.block_until_ready((self.state, out))
        return out if metrics else (time.perf_counter() - t0) / k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each contender per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of our measurement and TRL's")
    ap.add_argument("--prompts", type=int, default=8, help="rankings of 4 responses (6 pairs) per step")
    default_trl = ROOT / ".venv-trl" / "bin" / "python"
    ap.add_argument("--trl-python", default=str(default_trl) if default_trl.exists() else "",
                    help="interpreter of the TRL environment ('' skips TRL)")
    ap.add_argument("--trl-warmup", type=int, default=2, help="untimed TRL steps")
    args = ap.parse_args()
    cfg = ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      head_dim=64, d_ff=688, max_position_embeddings=512, eos_token_ids=(EOS,))
    B, P, R = args.prompts, 64, 64
    pairs = B * K * (K - 1) // 2
    optim = OptimSection(lr=1e-5, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0)
    model = make_model(cfg)
    optimizer, schedule = steps.make_optimizer(optim, TOTAL_STEPS), steps.lr_schedule(optim, TOTAL_STEPS)
    settings = dpo.DPOSettings(beta=0.1, loss="sigmoid")
    params = jax.device_get(init_params(model, jax.random.key(0)))
    batch = ranking_batch(B, P, R, cfg.vocab_size, seed=0)

    # The stage's step (dpo_parts.step_fns) jitted as the stage jits it: live reference, and precomputed.
    mesh = sharding.mesh_from_config(MeshSection())
    state_sh = state_shardings(model, optimizer, mesh)
    step = functools.partial(dpo.dpo_step, model=model, optimizer=optimizer, schedule=schedule, accum=1,
                             settings=settings)
    reference = sharding.place(params, state_sh.params)
    live = Stepper(jit_step(step, state_sh, mesh, {}, state_sh.params), place_state(params, optimizer, state_sh),
                   batch, ({}, reference), mesh)
    score = jax.jit(functools.partial(dpo.response_logprobs, model))
    with_ref = {**batch, "ref_logps": np.asarray(score(reference, to_global(batch, mesh)))}
    precomputed = Stepper(jit_step(lambda s, b, r, f: step(s, b, r, f, None), state_sh, mesh, {}),
                          place_state(params, optimizer, state_sh), with_ref, ({},), mesh)
    flops = {"live": flops_of(live.compiled), "precomputed": flops_of(precomputed.compiled)}

    trl_python, trl_note = peer_python(args.trl_python, default_trl, "TRL")
    load_before = os.getloadavg()
    trl, model_dir = None, tempfile.TemporaryDirectory()
    if trl_python:
        hf.save_hf(Path(model_dir.name) / "model", params, cfg)  # TRL trains the same initial weights
        try:
            trl = Peer(trl_python, "trl_dpo.py", ["--warmup", str(args.trl_warmup), "--prompts", str(B),
                                                  "--prompt-len", str(P), "--response-len", str(R),
                                                  "--model", str(Path(model_dir.name) / "model")],
                       env=TRL_ENV)
        except RuntimeError as e:
            trl_note = f"TRL failed: {e}"
    rounds = []
    try:
        for r in range(args.rounds):
            cpu0 = own_cpu_seconds()
            row = {"step_s": live.run(args.steps), "step_cpu_s": (own_cpu_seconds() - cpu0) / args.steps}
            if trl is not None:
                try:
                    trl_result = trl.run(args.steps)
                    row["trl_step_s"] = trl_result["step_s"]
                    row["trl_step_cpu_s"] = trl_result["cpu_s"] / args.steps
                except RuntimeError as e:
                    trl_note, trl = f"TRL failed: {e}", None
            row["precomputed_step_s"] = precomputed.run(args.steps)
            row["matmul_peak_gflops"] = max(matmul_peak() for _ in range(3)) / 1e9
            row["loadavg_1m"] = os.getloadavg()[0]
            row = {k: round(v, 4) for k, v in row.items()}
            print(json.dumps({"round": r, **row}), file=sys.stderr)
            rounds.append(row)
    finally:
        if trl is not None:
            trl.close()
        model_dir.cleanup()

    med = lambda key: statistics.median(row[key] for row in rounds)
    # The shares of the peak and the speedups are taken round by round (against the matmul peak and the TRL time
    # of the same round, measured next to ours under the same load), then the median over the rounds.
    share = lambda key, name: statistics.median(flops[name] / row[key] / (row["matmul_peak_gflops"] * 1e9)
                                                for row in rounds)
    seconds, pre_seconds = med("step_s"), med("precomputed_step_s")
    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "prompts": B, "k": K,
              "pairs_per_step": pairs, "prompt": P, "response": R, "loss": "sigmoid", "beta": settings.beta,
              "dtype": "float32", "steps": args.steps, "rounds": args.rounds,
              "sequences_per_step": {"ours_policy": B * K, "ours_reference": B * K, "trl_policy": 2 * pairs,
                                     "trl_reference": 2 * pairs},
              "step_s": round(seconds, 4), "pairs_per_s": round(pairs / seconds, 2),
              "step_cpu_s": round(med("step_cpu_s"), 4),
              "precomputed_reference_step_s": round(pre_seconds, 4),
              "precomputed_reference_pairs_per_s": round(pairs / pre_seconds, 2),
              "gflop_per_step": round(flops["live"] / 1e9, 2),
              "gflop_per_step_precomputed": round(flops["precomputed"] / 1e9, 2),
              "matmul_peak_gflops": round(med("matmul_peak_gflops"), 1),
              "fraction_of_peak": round(share("step_s", "live"), 3),
              "precomputed_fraction_of_peak": round(share("precomputed_step_s", "precomputed"), 3),
              "first_loss": round(live.first_loss, 5)}
    if rounds and all("trl_step_s" in row for row in rounds):
        per_round = [row["trl_step_s"] / row["step_s"] for row in rounds]
        per_round_pre = [row["trl_step_s"] / row["precomputed_step_s"] for row in rounds]
        trl_seconds = med("trl_step_s")
        result.update(trl_step_s=round(trl_seconds, 4), trl_pairs_per_s=round(pairs / trl_seconds, 2),
                      speedup_vs_trl=round(statistics.median(per_round), 2),
                      speedup_vs_trl_per_round=[round(x, 2) for x in per_round],
                      trl_step_cpu_s=round(med("trl_step_cpu_s"), 4),
                      cpu_time_ratio_vs_trl=round(statistics.median(
                          row["trl_step_cpu_s"] / row["step_cpu_s"] for row in rounds), 2),
                      target_speedup=3.0,
                      target_met=bool(statistics.median(per_round) >= 3.0),
                      precomputed_speedup_vs_trl_live=round(statistics.median(per_round_pre), 2),
                      trl={k: v for k, v in trl_result.items() if k not in ("step_s", "pairs_per_s", "cpu_s")})
    else:
        result["trl_note"] = trl_note
    # The machine's 1-minute load average before and after (and per round): above the core count, other work was
    # running; the alternating rounds put it on both sides alike.
    result["loadavg_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    result["versions"] = {"jax": jax.__version__, "python": sys.version.split()[0]}
    result["env"] = measured_env()
    result["trl_env"] = "this environment less its MALLOC_* settings (glibc defaults)"
    result["round_results"] = rounds
    emit(result, args.out)


if __name__ == "__main__":
    main()
