"""Episodes/s of one whole GRPO iteration (group sampling, the reward function, reference log-probs, group
advantages, the update), its rollout / update split and its share of the FLOP bound, side by side with Google
Tunix's GRPOLearner on the same shapes.

  python benchmarks/grpo.py --out benchmarks/results/grpo_cpu.json

The tiny Llama of the decode and PPO benchmarks (vocab 2048, d 256, 4 layers, 4 heads, 2 KV heads, MLP 688) as
policy and reference; `--prompts` prompts (default 8) of 64 tokens, `--group` responses each (default 4), 64 new
tokens at temperature 1, 1 epoch, 1 minibatch, k3 KL with beta 0.04 as a loss term, clip 0.2, advantages scaled by
the group's std, sequence-level loss averaging, float32 (`--shape smollm2-135m`: benchmarks/ppo.py's shape of that
name, with its prompts of 128 tokens and 64 new tokens; Tunix beside it). The responses are scored by a reward
function of the decoded text (`even_token_share`: the share of a response's tokens that are even numbers; the
tokenizer writes token ids as decimal numbers), the same function on both sides. On our side it runs as the grpo
stage runs a `grpo.reward_function`: `stages.grpo.RewardFunction` (decoding, EOS truncation, checks) called through
the host callback inside the compiled iteration, with the stage's default `share_prompts` (each prompt's prefill and
teacher-forced passes run once per group; Tunix runs them per response). FLOPs are ours, from XLA's cost analysis
(so fewer per episode than Tunix executes): an episode's nominal FLOPs are `group.rollout` (sampling, the policy's
and the reference's teacher-forced passes) and `group.update` (its own forward and backward) compiled alone; the
iteration executes fewer, since the update reuses the rollout's forward of the policy (`executed_fraction_of_peak`
counts those). XLA counts a loop's body once, so the sampler's decode loop is counted as one step: the other N - 2
steps' FLOPs (one decode step compiled alone) are added. The peak is a 2048^3 float32 matmul measured in the same
run, round by round. The timed iteration is the stage's own program (`group.iteration` with the lap clock):
`rollout_s` and `update_s` are its laps.

Tunix runs in its own environment, `.venv-tunix` (rlhf_jax is not installed there), created once from the
repository root with:

  python3 -m venv .venv-tunix && .venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt

`--tunix-python` (default `.venv-tunix/bin/python` when it exists; otherwise Tunix is skipped with a note in the
JSON) runs benchmarks/tunix_grpo.py in that interpreter as one subprocess, built and compiled once, before any
timing. Then, `--rounds` times: `--iterations` of our whole iteration, as many of Tunix's learner (this process
waiting), then the matmul peak; so load on the machine falls on both sides alike. Every reported time is the median
over the rounds; every per-round value is kept under "round_results", with the CPU seconds each side's process
spent per iteration (all its threads: less sensitive to other work on the machine than the wall clock, though
spinning worker threads count too) and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax.config import OptimSection  # noqa: E402
from rlhf_jax.models.sampling import SamplingParams  # noqa: E402
from rlhf_jax.models.transformer import PAD_ID, init_params, make_model  # noqa: E402
from rlhf_jax.rl import group, ppo  # noqa: E402
from rlhf_jax.runtime.clock import LapClock  # noqa: E402
from rlhf_jax.stages.grpo import RewardFunction  # noqa: E402
from rlhf_jax.training import steps  # noqa: E402

# benchmarks/ppo.py (this script's folder is on the path): the measurement pieces of the PPO comparison
from heap import release_freed_memory  # noqa: E402
from ppo import ROOT, SHAPES, Peer, flops_of, matmul_peak, timed_iterations, tunix_model  # noqa: E402
from report import emit, measured_env  # noqa: E402

EOS = 1  # the EOS id of every shape in ppo.SHAPES


def even_token_share(prompts, completions, **_):
    """The reward of each response: the share of its tokens (decimal ids separated by spaces, EOS excluded) that are
    even; 0 for an empty response. The same function as benchmarks/tunix_grpo.py's."""
    rewards = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        rewards.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return rewards


def peer_python(given: str, default: Path, name: str) -> tuple[str, str]:
    """(the peer's interpreter or '', the note saying why it is skipped or '')."""
    if not given:
        return "", (f"{name} skipped: the interpreter was given as ''" if default.exists() else
                    f"{name} skipped: no {default.relative_to(ROOT)} (see this script's docstring to create it)")
    if not Path(given).exists():
        return "", f"{name} skipped: {given} does not exist"
    return given, ""


def own_cpu_seconds() -> float:
    """User and system CPU seconds of this process so far, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class IdTokenizer:
    """Token ids written as decimal numbers separated by spaces (Tunix's side decodes the same way). Called as a
    transformers tokenizer is (what `ResponseCodec` calls); text that is no number has no ids."""

    def __call__(self, text, **_) -> dict:
        ids = lambda t: [int(w) for w in t.split() if w.isdigit()]
        return {"input_ids": ids(text) if isinstance(text, str) else [ids(t) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--iterations", type=int, default=5, help="timed calls of each program per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of our measurement and Tunix's")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="responses per prompt")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="the model and prompt / response lengths of benchmarks/ppo.py's shape of that name")
    default_tunix = ROOT / ".venv-tunix" / "bin" / "python"
    ap.add_argument("--tunix-python", default=str(default_tunix) if default_tunix.exists() else "",
                    help="interpreter of the Tunix environment ('' skips Tunix)")
    ap.add_argument("--tunix-warmup", type=int, default=2, help="untimed Tunix iterations (compilation)")
    args = ap.parse_args()
    cfg, _, P, N = SHAPES[args.shape]
    B, G = args.prompts, args.group
    R = B * G
    optim = OptimSection(lr=1e-5, schedule="constant")
    models = group.GroupModels(policy=make_model(cfg), policy_opt=steps.make_optimizer(optim, 100),
                               sampling=SamplingParams(N, temperature=1.0, eos_ids=(EOS,), pad_id=PAD_ID))
    settings = group.GroupSettings(algorithm="grpo", group_size=G, epochs=1, minibatches=1, clip_ratio=0.2,
                                   kl_coef=0.04, scale_by_std=True, loss_average="sequence")
    policy = init_params(models.policy, jax.random.key(0))
    state = group.init_state(policy, models, jax.random.PRNGKey(2))
    frozen = group.Frozen(ref_params=jax.tree.map(jnp.copy, policy))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (B, P)), jnp.int32)
    mask = jnp.ones((B, P), bool)
    rewards_fn = RewardFunction(even_token_share, "benchmarks/grpo.py:even_token_share", IdTokenizer(), (EOS,))

    # The whole iteration as the stage runs it (one program, the reward function a host callback inside it, with
    # the lap clock that times its rollout and its update from inside). The rollout alone is compiled for its
    # FLOPs (the update's are the rest of the iteration's), and the update alone, with its own forward, for an
    # episode's nominal FLOPs.
    runtime = ppo.Runtime(clock=LapClock())
    step = jax.jit(lambda s, f, i, m: group.iteration(s, f, i, m, models=models, settings=settings,
                                                      rewards_fn=rewards_fn, runtime=runtime),
                   donate_argnums=0).lower(state, frozen, ids, mask).compile()
    ids_RP, mask_RP = group.repeat_prompts(ids, mask, settings)
    orders = group.minibatch_orders(jax.random.PRNGKey(4), B, settings)
    rng = jax.random.PRNGKey(3)
    rollout = jax.jit(lambda s, f, i, m, r, o: group.rollout(s, f, i, m, r, models, settings, rewards_fn,
                                                             first_order_MMb=o)[:2]
                      ).lower(state, frozen, ids_RP, mask_RP, rng, orders[0]).compile()
    batch = rollout(state, frozen, ids_RP, mask_RP, rng, orders[0])[0]
    update = jax.jit(lambda p, b, o: group.update(p, b, o, models, settings)).lower(state.policy, batch,
                                                                                   orders).compile()
    # Responses run to the end here (random weights rarely draw EOS): the decode loop's N - 1 steps all run.
    flops = {"iteration": flops_of(step), "rollout": flops_of(rollout)}
    flops["update"] = flops["iteration"] - flops["rollout"]
    flops["nominal"] = flops["rollout"] + flops_of(update)
    del batch

    tunix_python, tunix_note = peer_python(args.tunix_python, default_tunix, "Tunix")
    if cfg.family != "llama":
        tunix_python, tunix_note = "", "Tunix skipped: its learner is timed at Llama shapes only"

    load_before = os.getloadavg()
    release_freed_memory()  # the compilations' peak, before the peer compiles
    tunix = None
    if tunix_python:
        try:
            tunix = Peer(tunix_python, "tunix_grpo.py", ["--warmup", str(args.tunix_warmup), "--prompts", str(B),
                                                         "--group", str(G), "--shape", tunix_model(cfg, B, P, N)])
        except RuntimeError as e:
            tunix_note = f"Tunix failed: {e}"
    rounds, last_metrics = [], {}
    try:
        for r in range(args.rounds):
            # The two whole iterations back to back (what the speedup compares), then the peak.
            row = {}
            cpu0 = own_cpu_seconds()
            row["iteration_s"], state, laps = timed_iterations(step, state, (frozen, ids, mask), args.iterations)
            # CPU seconds per timed iteration (the untimed first call of timed_iterations excluded pro rata)
            row["iteration_cpu_s"] = (own_cpu_seconds() - cpu0) / (args.iterations + 1)
            if rewards_fn.problem:
                raise SystemExit(f"the reward function failed: {rewards_fn.problem}")
            if tunix is not None:
                release_freed_memory()
                try:
                    tunix_result = tunix.run(args.iterations)
                    row["tunix_iteration_s"] = tunix_result["iteration_s"]
                    # its untimed first iteration (benchmarks/heap.py) excluded pro rata, as ours
                    row["tunix_iteration_cpu_s"] = tunix_result["cpu_s"] / (args.iterations + 1)
                except RuntimeError as e:
                    tunix_note, tunix = f"Tunix failed: {e}", None
            row["rollout_s"], row["update_s"] = (statistics.median(float(m[k]) for m in laps)
                                                 for k in ("rollout_s", "update_s"))
            row["matmul_peak_gflops"] = max(matmul_peak() for _ in range(3)) / 1e9
            row["loadavg_1m"] = os.getloadavg()[0]
            row = {k: round(v, 4) for k, v in row.items()}
            print(json.dumps({"round": r, **row}), file=sys.stderr)
            rounds.append(row)
            last_metrics = laps[-1]
    finally:
        if tunix is not None:
            tunix.close()

    med = lambda key: statistics.median(row[key] for row in rounds)
    # Shares of the FLOP bound and the speedup are taken round by round (against the matmul peak and the Tunix
    # time of the same round, measured next to ours under the same load), then the median over the rounds.
    share = lambda key, name: statistics.median(flops[name] / row[key] / (row["matmul_peak_gflops"] * 1e9)
                                                for row in rounds)
    seconds = med("iteration_s")
    result = {"shape": args.shape, "layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
              "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "prompts": B, "group": G,
              "episodes_per_iteration": R, "prompt": P, "new_tokens": N, "epochs": 1, "minibatches": 1,
              "kl_coef": settings.kl_coef, "kl_estimator": "k3", "clip_ratio": settings.clip_ratio,
              "loss_average": settings.loss_average, "reward_function": "even_token_share (host callback)",
              "dtype": "float32", "iterations": args.iterations, "rounds": args.rounds,
              "iteration_s": round(seconds, 4), "episodes_per_s": round(R / seconds, 2),
              "iteration_cpu_s": round(med("iteration_cpu_s"), 4),
              "rollout_s": round(med("rollout_s"), 4), "update_s": round(med("update_s"), 4),
              "gflop_per_episode": round(flops["nominal"] / 1e9 / R, 3),
              "gflop_executed_per_iteration": round(flops["iteration"] / 1e9, 2),
              "gflop_rollout": round(flops["rollout"] / 1e9, 2), "gflop_update": round(flops["update"] / 1e9, 2),
              "achieved_gflops": round(flops["iteration"] / seconds / 1e9, 1),
              "matmul_peak_gflops": round(med("matmul_peak_gflops"), 1),
              "fraction_of_flop_bound": round(share("iteration_s", "nominal"), 3),
              "executed_fraction_of_peak": round(share("iteration_s", "iteration"), 3),
              "rollout_fraction_of_flop_bound": round(share("rollout_s", "rollout"), 3),
              "update_fraction_of_flop_bound": round(share("update_s", "update"), 3),
              "response_length": round(float(last_metrics.get("response_length", float("nan"))), 2),
              "reward_mean": round(float(last_metrics.get("reward_mean", float("nan"))), 4)}
    if rounds and all("tunix_iteration_s" in row for row in rounds):
        tunix_seconds = med("tunix_iteration_s")
        per_round = [row["tunix_iteration_s"] / row["iteration_s"] for row in rounds]
        result.update(tunix_iteration_s=round(tunix_seconds, 4), tunix_episodes_per_s=round(R / tunix_seconds, 2),
                      speedup_vs_tunix=round(statistics.median(per_round), 2),
                      speedup_vs_tunix_per_round=[round(x, 2) for x in per_round],
                      tunix_iteration_cpu_s=round(med("tunix_iteration_cpu_s"), 4),
                      cpu_time_ratio_vs_tunix=round(statistics.median(
                          row["tunix_iteration_cpu_s"] / row["iteration_cpu_s"] for row in rounds), 2),
                      target_speedup=1.5,
                      target_met=bool(statistics.median(per_round) >= 1.5),
                      tunix={k: v for k, v in tunix_result.items()
                             if k not in ("iteration_s", "episodes_per_s", "cpu_s")})
    else:
        result["tunix_note"] = tunix_note
    # The machine's 1-minute load average before and after (and per round): above the core count, other work was
    # running; the alternating rounds put it on both sides alike.
    result["loadavg_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB
    result["versions"] = {"jax": jax.__version__, "python": sys.version.split()[0]}
    result["env"] = measured_env()
    result["round_results"] = rounds
    emit(result, args.out)


if __name__ == "__main__":
    main()
