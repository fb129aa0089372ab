"""Training throughput on one device, in one run; prints one JSON document (progress lines go to stderr).

1. sft: our jitted, donated `steps.sft_step` against a plain PyTorch step of the same weights
   (transformers `LlamaForCausalLM` loaded from `hf.save_hf`, `torch.optim.AdamW`, clip_grad_norm_) - tokens/s;
   the tiny Llama, or with `--sft-model smollm2-135m` a real small model's shapes.
2. mfu: model FLOPs utilisation of our SFT step on a larger Llama, against the matmul peak measured in the same
   run (a jitted 2048^3 `jnp.dot` on CPU, 8192^3 on an accelerator, in the step's compute dtype) and, on a GPU
   whose datasheet peak is known, against that. Model FLOPs per step use the PaLM formula
   6 * N * tokens + 12 * L * H * Q * T * tokens, N = non-embedding params + lm_head. `--mfu-model 1b` (TinyLlama
   1.1B shapes) with `--dtype bfloat16 --mfu-batch 8 --mfu-seq 2048` is the accelerator measure
   (benchmarks/gpu_check.sh); `--skip sft rm` runs it alone.
3. rm: comparisons/s of our K-way `steps.rm_step` (one forward over the B*K completions) against a pairwise
   baseline in JAX (the same data expanded to C(K,2) chosen/rejected pairs, two forward passes per pair, mean
   -log sigmoid loss, the same optimizer).

Each contender is compiled and warmed up first; then the timed steps of the contenders of one measure alternate in
`--rounds` blocks (with a short pause and one untimed step before each block), so that load from other processes
hits both sides alike.
Per contender the JSON also has the CPU cores kept busy, the share of that CPU time spent in the kernel and the
minor page faults per step (a step that maps fresh memory every call shows up there). The glibc malloc tunables
in effect (GLIBC_TUNABLES and MALLOC_* variables) are recorded, since they change the numbers.

  python benchmarks/train.py [--steps 10] [--rounds 2] [--out FILE]
  python benchmarks/train.py --skip mfu rm --sft-model smollm2-135m --batch 8 --seq 256 --steps 4
  python benchmarks/train.py --skip sft rm --mfu-model 1b --dtype bfloat16 --mfu-batch 8 --mfu-seq 2048
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlhf_jax.config import OptimSection  # noqa: E402
from rlhf_jax.data.rankings import pairs_from_ranks  # noqa: E402
from rlhf_jax.models import hf
from rlhf_jax.models.checkpoint import model_config_to_json  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model  # noqa: E402
from rlhf_jax.training import steps  # noqa: E402
from rlhf_jax.training.losses import last_token_values

from ppo import SMOLLM2_135M  # noqa: E402  benchmarks/ppo.py
from report import emit  # noqa: E402

TINY = ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                   d_ff=688, max_position_embeddings=1024, eos_token_ids=(), bos_token_id=0)
MFU_MODELS = {
    "small": ModelConfig(family="llama", vocab_size=2048, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                         head_dim=64, d_ff=1376, max_position_embeddings=1024, eos_token_ids=(), bos_token_id=0),
    # TinyLlama-1.1B's shapes: the accelerator measure
    "1b": ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                      head_dim=64, d_ff=5632, max_position_embeddings=2048, eos_token_ids=(), bos_token_id=0),
}
# The sft measure's models: the tiny Llama, and a real small model's shapes (SmolLM2-135M, its head tied).
SFT_MODELS = {
    "tiny": TINY,
    "smollm2-135m": SMOLLM2_135M,
}
# Dense bf16 peak FLOP/s of a datasheet, by a substring of jax's device_kind (SXM parts).
NOMINAL_BF16_PEAK = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "A100": 312e12}
OPTIM = OptimSection(lr=1e-4, grad_clip=1.0, weight_decay=0.0, schedule="constant")
TOTAL_STEPS = 1000  # schedule length: irrelevant for a constant schedule


def log(**kw) -> None:
    print(json.dumps(kw), file=sys.stderr, flush=True)


def r(x: float, n: int = 4) -> float:
    return round(float(x), n)


def _usage() -> tuple[float, float, int]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_stime, u.ru_minflt


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def interleave(contenders: dict, rounds: int, pause_s: float = 0.3) -> dict:
    """contenders: name -> (fn, calls per round), fn blocking until its work is done. The names take turns
    block by block, each block after one untimed call: while the others run, a machine may page out memory left
    idle (this one does after about a minute), and the first call back then faults it in again, which no
    training run that has the machine to itself pays. Returns name -> timing summary."""
    acc = {name: {"times": [], "cpu": 0.0, "sys": 0.0, "faults": 0} for name in contenders}
    for _ in range(rounds):
        for name, (fn, calls) in contenders.items():
            time.sleep(pause_s)  # let the other library's worker threads go idle
            fn()
            a = acc[name]
            cpu0, sys0, flt0 = _usage()
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                a["times"].append(time.perf_counter() - t0)
            cpu1, sys1, flt1 = _usage()
            a["cpu"] += cpu1 - cpu0
            a["sys"] += sys1 - sys0
            a["faults"] += flt1 - flt0
    out = {}
    for name, a in acc.items():
        wall = sum(a["times"])
        out[name] = {"median_s": statistics.median(a["times"]), "min_s": min(a["times"]), "times": a["times"],
                     "cpu_cores_busy": a["cpu"] / wall, "kernel_cpu_share": a["sys"] / max(a["cpu"], 1e-9),
                     "minor_faults_per_step": a["faults"] / len(a["times"])}
    return out


def usage_fields(prefix: str, t: dict) -> dict:
    return {f"{prefix}_cpu_cores_busy": r(t["cpu_cores_busy"], 2), f"{prefix}_kernel_cpu_share": r(t["kernel_cpu_share"], 3),
            f"{prefix}_minor_faults_per_step": round(t["minor_faults_per_step"])}


class JaxStepper:
    """A jitted, donated `(state, batch, rng, frozen) -> (state, metrics)` step, compiled and warmed up on creation;
    calling it runs one step and blocks until it is done."""

    def __init__(self, step_fn, params, optimizer, batch: dict):
        self.step = jax.jit(step_fn, donate_argnums=0)
        self.state = jax.jit(lambda p: steps.init_state(p, optimizer))(jax.tree.map(jnp.asarray, params))
        self.batch = jax.device_put(batch)
        self.rng = jax.random.key(0)
        t0 = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - t0
        self.first_loss = float(self.metrics["loss"])
        self()  # a second warm-up step, compiled already

    def __call__(self):
        self.state, self.metrics = self.step(self.state, self.batch, self.rng, {})  # {}: nothing frozen
        jax.block_until_ready((self.state, self.metrics))


# ------------------------------------------------------------------------------------------------ sft


def sft_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)
    response_mask = np.ones((batch, seq), bool)
    response_mask[:, 0] = False
    return {"ids": ids, "mask": np.ones((batch, seq), bool), "response_mask": response_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def our_sft(cfg: ModelConfig, params, batch: dict, dtype: str = "float32") -> JaxStepper:
    model = make_model(cfg, dtype=dtype)
    optimizer = steps.make_optimizer(OPTIM, TOTAL_STEPS)
    schedule = steps.lr_schedule(OPTIM, TOTAL_STEPS)
    step = functools.partial(steps.sft_step, model=model, optimizer=optimizer, schedule=schedule)
    return JaxStepper(step, params, optimizer, batch)


class TorchSFT:
    """The same model in transformers, with a plain PyTorch training step; warmed up on creation."""

    def __init__(self, cfg: ModelConfig, params, batch: dict):
        import torch
        import transformers

        self.torch = torch
        with tempfile.TemporaryDirectory() as d:
            hf.save_hf(d, params, cfg)
            self.model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
        self.model.train()
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                                     weight_decay=OPTIM.weight_decay)
        self.ids = torch.tensor(batch["ids"], dtype=torch.long)
        self.labels = self.ids.clone()
        self.labels[~torch.tensor(batch["response_mask"])] = -100  # never a target (HF shifts the labels anyway)
        self.attention_mask = torch.tensor(batch["mask"], dtype=torch.long)
        self.position_ids = torch.tensor(batch["positions"], dtype=torch.long)
        self.losses = []
        t0 = time.perf_counter()
        self()
        self.first_step_s = time.perf_counter() - t0
        self.first_loss = self.losses[0]
        self()

    def __call__(self):
        loss = self.model(input_ids=self.ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                          labels=self.labels).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM.grad_clip)
        self.opt.step()
        self.opt.zero_grad()
        self.losses.append(float(loss.detach()))


def run_sft(args) -> dict:
    cfg = SFT_MODELS[args.sft_model]
    params = jax.device_get(init_params(make_model(cfg), jax.random.key(0)))
    batch = sft_batch(cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    pt = TorchSFT(cfg, params, batch)
    ours = our_sft(cfg, params, batch)
    per = math.ceil(args.steps / args.rounds)
    # The matmul peak in the same blocks: how close each step comes to the compute bound at this shape.
    t = interleave({"torch": (pt, per), "ours": (ours, per), "matmul": (matmul_fn(2048), 3)}, args.rounds)
    speedup = t["torch"]["median_s"] / t["ours"]["median_s"]
    flops, _ = model_flops_per_step(cfg, params, args.batch, args.seq)
    peak = 2.0 * 2048 ** 3 / t["matmul"]["median_s"]
    out = dict(
        model_name=args.sft_model, model=model_config_to_json(cfg), n_params=count_params(params), batch=args.batch,
        seq=args.seq,
        tokens_per_step=tokens, timed_steps_each=per * args.rounds, rounds=args.rounds,
        ours_median_step_s=r(t["ours"]["median_s"]), ours_min_step_s=r(t["ours"]["min_s"]),
        ours_tokens_per_s=r(tokens / t["ours"]["median_s"], 1), ours_compile_s=r(ours.compile_s, 2),
        torch_median_step_s=r(t["torch"]["median_s"]), torch_min_step_s=r(t["torch"]["min_s"]),
        torch_tokens_per_s=r(tokens / t["torch"]["median_s"], 1), torch_first_step_s=r(pt.first_step_s, 3),
        torch_attn_implementation=pt.attn_implementation,
        speedup=r(speedup, 3), target_speedup=1.2, target_met=bool(speedup >= 1.2),
        model_flops_per_step=flops, matmul_peak_gflops=r(peak / 1e9, 1),
        ours_mfu=r(flops / t["ours"]["median_s"] / peak), torch_mfu=r(flops / t["torch"]["median_s"] / peak),
        # Same weights, same tokens: the first-step losses must agree (both sides train the same model).
        ours_first_loss=r(ours.first_loss, 5), torch_first_loss=r(pt.first_loss, 5),
        **usage_fields("ours", t["ours"]), **usage_fields("torch", t["torch"]),
        ours_step_times_s=[r(x) for x in t["ours"]["times"]], torch_step_times_s=[r(x) for x in t["torch"]["times"]])
    for name in ("torch", "ours"):
        log(measure=f"sft_{name}", median_s=r(t[name]["median_s"]), tokens_per_s=r(tokens / t[name]["median_s"], 1),
            cores_busy=r(t[name]["cpu_cores_busy"], 2), kernel_share=r(t[name]["kernel_cpu_share"], 3),
            faults_per_step=round(t[name]["minor_faults_per_step"]))
    log(measure="sft", speedup=out["speedup"], first_loss=[out["ours_first_loss"], out["torch_first_loss"]])
    return out


# ------------------------------------------------------------------------------------------------ mfu


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def model_flops_per_step(cfg: ModelConfig, params, batch: int, seq: int) -> tuple[float, int]:
    """PaLM: 6 * N * tokens + 12 * L * H * Q * T * tokens, N = every param except the input embedding (a head tied
    to it counts once, as the head)."""
    n = count_params(params) - (0 if cfg.tie_embeddings else int(np.prod(params["embed"].shape)))
    tokens = batch * seq
    return 6.0 * n * tokens + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * tokens, n


def matmul_fn(n: int = 2048, dtype: str = "float32"):
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    fn = lambda: dot(a, b).block_until_ready()
    fn()
    fn()
    return fn


def nominal_peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    if dtype != "bfloat16" or jax.default_backend() == "cpu":
        return None
    return next((peak for name, peak in NOMINAL_BF16_PEAK.items() if name in kind), None)


def run_mfu(args) -> dict:
    cfg = MFU_MODELS[args.mfu_model]
    n = 2048 if jax.default_backend() == "cpu" else 8192
    peak_fn = matmul_fn(n, args.dtype)
    batch_size, seq = args.mfu_batch or args.batch, args.mfu_seq or args.seq
    params = jax.device_get(init_params(make_model(cfg), jax.random.key(0)))
    batch = sft_batch(cfg, batch_size, seq)
    flops, n_counted = model_flops_per_step(cfg, params, batch_size, seq)
    ours = our_sft(cfg, params, batch, args.dtype)
    per = math.ceil(args.mfu_steps / args.rounds)
    t = interleave({"matmul": (peak_fn, 5), "ours": (ours, per)}, args.rounds)
    peak = 2.0 * n ** 3 / t["matmul"]["median_s"]
    model_fps = flops / t["ours"]["median_s"]
    mfu = model_fps / peak
    out = dict(
        model_name=args.mfu_model, model=model_config_to_json(cfg), dtype=args.dtype, n_params=count_params(params),
        n_params_nonembedding_plus_head=n_counted, batch=batch_size, seq=seq,
        tokens_per_step=batch_size * seq, timed_steps=per * args.rounds, rounds=args.rounds,
        model_flops_per_step=flops, median_step_s=r(t["ours"]["median_s"]), min_step_s=r(t["ours"]["min_s"]),
        compile_s=r(ours.compile_s, 2), model_gflops_per_s=r(model_fps / 1e9, 2),
        matmul_peak=dict(n=n, dtype=args.dtype, calls=len(t["matmul"]["times"]), median_s=r(t["matmul"]["median_s"], 5),
                         gflops_per_s=r(peak / 1e9, 2), best_gflops_per_s=r(2.0 * n ** 3 / t["matmul"]["min_s"] / 1e9, 2)),
        mfu=r(mfu), mfu_vs_best_peak=r(model_fps * t["matmul"]["min_s"] / (2.0 * n ** 3)),
        target_mfu=0.55, target_met=bool(mfu >= 0.55), **usage_fields("step", t["ours"]),
        step_times_s=[r(x) for x in t["ours"]["times"]])
    if (nominal := nominal_peak(args.dtype)) is not None:
        out.update(nominal_peak_tflops=r(nominal / 1e12, 1), mfu_vs_nominal_peak=r(model_fps / nominal),
                   target_mfu=0.45, target_met=bool(model_fps / nominal >= 0.45))
    log(measure="matmul_peak", gflops=out["matmul_peak"]["gflops_per_s"], median_s=out["matmul_peak"]["median_s"])
    log(measure="mfu", mfu=out["mfu"], model_gflops=out["model_gflops_per_s"], step_s=out["median_step_s"],
        kernel_share=out["step_kernel_cpu_share"], faults_per_step=out["step_minor_faults_per_step"])
    return out


# ------------------------------------------------------------------------------------------------- rm


def rm_batch(cfg: ModelConfig, B: int, K: int, P: int, R: int, seed: int = 0) -> dict:
    """Left-padded prompts, right-padded responses of random lengths, pairs those of a random ranking of the K."""
    rng = np.random.default_rng(seed)
    prompt_mask = np.arange(P)[None, :] >= (P - rng.integers(P // 2, P + 1, B))[:, None]
    response_mask = np.arange(R)[None, None, :] < rng.integers(R // 4, R + 1, (B, K))[:, :, None]
    prompt_ids = np.where(prompt_mask, rng.integers(1, cfg.vocab_size, (B, P)), 0).astype(np.int32)
    response_ids = np.where(response_mask, rng.integers(1, cfg.vocab_size, (B, K, R)), 0).astype(np.int32)
    pairs = np.zeros((B, K, K), np.int32)
    for b in range(B):
        pairs[b][pairs_from_ranks(rng.permutation(K))] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "pairs": pairs}


def pairwise_batch(batch: dict) -> dict:
    """The K-way batch expanded to every (chosen, rejected) pair: (B * C(K,2), P + R) arrays per side."""
    B = batch["response_ids"].shape[0]
    side = {"chosen": ([], []), "rejected": ([], [])}
    for b in range(B):
        for w, l in zip(*np.nonzero(batch["pairs"][b])):  # each pair once: a full ranking has no repeats
            for name, k in (("chosen", w), ("rejected", l)):
                side[name][0].append(np.concatenate([batch["prompt_ids"][b], batch["response_ids"][b, k]]))
                side[name][1].append(np.concatenate([batch["prompt_mask"][b], batch["response_mask"][b, k]]))
    return {f"{name}_{key}": np.stack(rows) for name, (ids, masks) in side.items()
            for key, rows in (("ids", ids), ("mask", masks))}


def pairwise_step(state: steps.TrainState, batch: dict, rng, frozen, *, model, optimizer, schedule):
    """A pairwise trainer's step: rewards of the chosen and of the rejected sequences (two forward passes),
    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected), then the same optimizer update (the stages'
    step signature; nothing is frozen)."""
    del rng, frozen

    def rewards(params, ids, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        values, _ = model.apply({"params": params}, ids, positions, mask)
        return last_token_values(values, mask)

    def loss_fn(params):
        margin = (rewards(params, batch["chosen_ids"], batch["chosen_mask"])
                  - rewards(params, batch["rejected_ids"], batch["rejected_mask"]))
        return jnp.mean(jax.nn.softplus(-margin)), jnp.mean(margin > 0)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    stats = {"grad_norm": optax.global_norm(grads), "lr": schedule(state.step), "loss": loss, "accuracy": acc}
    return steps.TrainState(step=state.step + 1, params=params, opt_state=opt_state), stats


def run_rm(args) -> dict:
    B, K, P, R = args.rm_prompts, 4, 64, 64
    model = make_model(TINY, head="scalar")
    params = jax.device_get(init_params(model, jax.random.key(0)))
    optimizer = steps.make_optimizer(OPTIM, TOTAL_STEPS)
    schedule = steps.lr_schedule(OPTIM, TOTAL_STEPS)
    kway = rm_batch(TINY, B, K, P, R)
    comparisons = B * K * (K - 1) // 2
    kw = dict(model=model, optimizer=optimizer, schedule=schedule)
    ours = JaxStepper(functools.partial(steps.rm_step, **kw), params, optimizer, kway)
    base = JaxStepper(functools.partial(pairwise_step, **kw), params, optimizer, pairwise_batch(kway))
    per = math.ceil(args.steps / args.rounds)
    t = interleave({"ours": (ours, per), "pairwise": (base, per)}, args.rounds)
    ratio = t["pairwise"]["median_s"] / t["ours"]["median_s"]
    out = dict(
        model=model_config_to_json(TINY), head="scalar", prompts=B, K=K, prompt_len=P, response_len=R,
        comparisons_per_step=comparisons, timed_steps_each=per * args.rounds, rounds=args.rounds,
        ours_sequences_per_step=B * K, pairwise_sequences_per_step=2 * comparisons,
        ours_median_step_s=r(t["ours"]["median_s"]), ours_comparisons_per_s=r(comparisons / t["ours"]["median_s"], 1),
        ours_compile_s=r(ours.compile_s, 2),
        pairwise_median_step_s=r(t["pairwise"]["median_s"]),
        pairwise_comparisons_per_s=r(comparisons / t["pairwise"]["median_s"], 1),
        pairwise_compile_s=r(base.compile_s, 2),
        speedup=r(ratio, 3), target_speedup=2.5, target_met=bool(ratio >= 2.5),
        # Same pairs, same weights: the K-way loss (mean over prompts of the mean over their 6 pairs) equals the
        # pairwise mean when every prompt has all 6 pairs (no ties).
        ours_first_loss=r(ours.first_loss, 5), pairwise_first_loss=r(base.first_loss, 5),
        **usage_fields("ours", t["ours"]), **usage_fields("pairwise", t["pairwise"]),
        ours_step_times_s=[r(x) for x in t["ours"]["times"]],
        pairwise_step_times_s=[r(x) for x in t["pairwise"]["times"]])
    for name in ("ours", "pairwise"):
        log(measure=f"rm_{name}", median_s=r(t[name]["median_s"]),
            comparisons_per_s=r(comparisons / t[name]["median_s"], 1), kernel_share=r(t[name]["kernel_cpu_share"], 3),
            faults_per_step=round(t[name]["minor_faults_per_step"]))
    log(measure="rm", speedup=out["speedup"], first_loss=[out["ours_first_loss"], out["pairwise_first_loss"]])
    return out


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender, sft and rm (after warm-up)")
    ap.add_argument("--mfu-steps", type=int, default=6, help="timed steps of the larger model")
    ap.add_argument("--rounds", type=int, default=2, help="blocks the timed steps of the contenders alternate in")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rm-prompts", type=int, default=8)
    ap.add_argument("--sft-model", choices=sorted(SFT_MODELS), default="tiny", help="the model of the sft measure")
    ap.add_argument("--mfu-model", choices=sorted(MFU_MODELS), default="small")
    ap.add_argument("--mfu-batch", type=int, default=0, help="rows of the mfu measure's batch (0: --batch)")
    ap.add_argument("--mfu-seq", type=int, default=0, help="its sequence length (0: --seq)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype of the mfu measure (params stay float32); sft and rm run in float32")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sft", "mfu", "rm"])
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch
    import transformers

    t_start = time.perf_counter()
    result = dict(benchmark="train", device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                  n_devices=jax.device_count(), platform=platform.platform(), processor=platform.processor(),
                  cpu_count=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                  transformers=transformers.__version__, torch_threads=torch.get_num_threads(), dtype="float32",
                  malloc_env={k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")},
                  optim=dict(lr=OPTIM.lr, b1=OPTIM.b1, b2=OPTIM.b2, eps=OPTIM.eps, grad_clip=OPTIM.grad_clip,
                             weight_decay=OPTIM.weight_decay, schedule=OPTIM.schedule),
                  # Other processes on the machine skew every number: the 1-minute load average around the run.
                  load_average_start=r(os.getloadavg()[0], 2))
    busy0, (cpu0, _, _) = _machine_busy_s(), _usage()
    for name, fn in (("sft", run_sft), ("mfu", run_mfu), ("rm", run_rm)):
        if name not in args.skip:
            result[name] = fn(args)
    result["load_average_end"] = r(os.getloadavg()[0], 2)
    result["total_s"] = r(time.perf_counter() - t_start, 1)
    busy1, (cpu1, _, _) = _machine_busy_s(), _usage()
    if busy0 is not None and busy1 is not None:  # cores that other processes kept busy, on average, during the run
        result["other_processes_cores_busy"] = r(max(busy1 - busy0 - (cpu1 - cpu0), 0.0) / result["total_s"], 2)
    emit(result, args.out)


if __name__ == "__main__":
    main()
