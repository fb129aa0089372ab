"""Training throughput on one device, in one run; prints one JSON document (progress lines go to stderr).

1. sft: our jitted, donated `steps.sft_step` against a plain PyTorch step of the same weights
   (transformers `LlamaForCausalLM` loaded from `hf.save_hf`, `torch.optim.AdamW`, clip_grad_norm_) - tokens/s.
2. mfu: model FLOPs utilisation of our SFT step on a larger Llama, against the matmul peak measured here
   (a jitted float32 2048^3 `jnp.dot`). Model FLOPs per step use the PaLM formula
   6 * N * tokens + 12 * L * H * Q * T * tokens, N = non-embedding params + lm_head.
3. rm: comparisons/s of our K-way `steps.rm_step` (one forward over the B*K completions) against a pairwise
   baseline in JAX (the same data expanded to C(K,2) chosen/rejected pairs, two forward passes per pair, mean
   -log sigmoid loss, the same optimizer).

  python benchmarks/train.py [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlhf_jax import hf, steps  # noqa: E402
from rlhf_jax.config import OptimSection  # noqa: E402
from rlhf_jax.losses import last_token_values  # noqa: E402
from rlhf_jax.model import ModelConfig, init_params, make_model  # noqa: E402

TINY = ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                   d_ff=688, max_position_embeddings=1024, eos_token_ids=(), bos_token_id=0)
MFU_MODEL = ModelConfig(family="llama", vocab_size=2048, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                        head_dim=64, d_ff=1376, max_position_embeddings=1024, eos_token_ids=(), bos_token_id=0)
OPTIM = OptimSection(lr=1e-4, grad_clip=1.0, weight_decay=0.0, schedule="constant")


def log(**kw) -> None:
    print(json.dumps(kw), file=sys.stderr, flush=True)


def cfg_json(cfg: ModelConfig) -> dict:
    return hf.model_config_to_json(cfg)


def timed(fn, n: int) -> list[float]:
    """Wall time of each of `n` calls of `fn` (which must block until its work is done)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------------ sft


def sft_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)
    response_mask = np.ones((batch, seq), bool)
    response_mask[:, 0] = False
    return {"ids": ids, "mask": np.ones((batch, seq), bool), "response_mask": response_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def our_sft(cfg: ModelConfig, params, batch: dict, n_steps: int) -> dict:
    model = make_model(cfg)
    optimizer = steps.make_optimizer(OPTIM, 1000)
    schedule = steps.lr_schedule(OPTIM, 1000)
    step = jax.jit(functools.partial(steps.sft_step, model=model, optimizer=optimizer, schedule=schedule),
                   donate_argnums=0)
    state = jax.jit(lambda p: steps.init_state(p, optimizer))(jax.device_put(params))
    batch = jax.device_put(batch)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    first_loss = float(metrics["loss"])
    state, metrics = step(state, batch, rng)  # a second warm-up step, compiled already
    jax.block_until_ready((state, metrics))

    def one():
        nonlocal state, metrics
        state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))

    times = timed(one, n_steps)
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s,
            "first_loss": first_loss, "last_loss": float(metrics["loss"]), "times": times}


def torch_sft(cfg: ModelConfig, params, batch: dict, n_steps: int) -> dict:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(d, params, cfg)
        model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    ids = torch.tensor(batch["ids"], dtype=torch.long)
    labels = ids.clone()
    labels[~torch.tensor(batch["response_mask"])] = -100  # the first token is never a target (HF shifts anyway)
    attention_mask = torch.tensor(batch["mask"], dtype=torch.long)
    position_ids = torch.tensor(batch["positions"], dtype=torch.long)
    losses = []

    def one():
        loss = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    one()
    first_s = time.perf_counter() - t0
    one()
    times = timed(one, n_steps)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_step_s": first_s,
            "first_loss": losses[0], "last_loss": losses[-1], "times": times,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


# ------------------------------------------------------------------------------------------------ mfu


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def model_flops_per_step(cfg: ModelConfig, params, batch: int, seq: int) -> tuple[float, int]:
    """PaLM: 6 * N * tokens + 12 * L * H * Q * T * tokens, N = every param except the input embedding."""
    n = count_params(params) - int(np.prod(params["embed"].shape))
    tokens = batch * seq
    return 6.0 * n * tokens + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * tokens, n


def matmul_peak(n: int = 2048, repeats: int = 7) -> dict:
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    times = timed(lambda: dot(a, b).block_until_ready(), repeats)
    med = statistics.median(times)
    return {"n": n, "median_s": med, "min_s": min(times), "flops_per_s": 2.0 * n ** 3 / med,
            "best_flops_per_s": 2.0 * n ** 3 / min(times)}


# ------------------------------------------------------------------------------------------------- rm


def rm_batch(cfg: ModelConfig, B: int, K: int, P: int, R: int, seed: int = 0) -> dict:
    """Left-padded prompts, right-padded responses of random lengths, ranks a random permutation of 0..K-1."""
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(1, cfg.vocab_size, (B, P)).astype(np.int32)
    prompt_mask = np.arange(P)[None, :] >= (P - rng.integers(P // 2, P + 1, B))[:, None]
    response_ids = rng.integers(1, cfg.vocab_size, (B, K, R)).astype(np.int32)
    response_mask = np.arange(R)[None, None, :] < rng.integers(R // 4, R + 1, (B, K))[:, :, None]
    prompt_ids = np.where(prompt_mask, prompt_ids, 0)
    response_ids = np.where(response_mask, response_ids, 0)
    ranks = np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "ranks": ranks}


def pairwise_batch(batch: dict) -> dict:
    """The K-way batch expanded to every (chosen, rejected) pair: (B * C(K,2), P + R) each side."""
    B, K, _ = batch["response_ids"].shape
    side = {"chosen": ([], []), "rejected": ([], [])}
    for b in range(B):
        for i, j in itertools.combinations(range(K), 2):
            w, l = (i, j) if batch["ranks"][b, i] < batch["ranks"][b, j] else (j, i)
            for name, k in (("chosen", w), ("rejected", l)):
                side[name][0].append(np.concatenate([batch["prompt_ids"][b], batch["response_ids"][b, k]]))
                side[name][1].append(np.concatenate([batch["prompt_mask"][b], batch["response_mask"][b, k]]))
    return {f"{name}_{key}": np.stack(rows) for name, (ids, masks) in side.items()
            for key, rows in (("ids", ids), ("mask", masks))}


def pairwise_step(state: steps.TrainState, batch: dict, rng, *, model, optimizer, schedule):
    """A pairwise trainer's step: rewards of the chosen and of the rejected sequences (two forward passes),
    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)."""
    del rng

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


def time_rm(step_fn, params, optimizer, batch: dict, n_steps: int) -> dict:
    step = jax.jit(step_fn, donate_argnums=0)
    state = jax.jit(lambda p: steps.init_state(p, optimizer))(jax.tree.map(jnp.array, params))
    batch = jax.device_put(batch)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    first_loss = float(metrics["loss"])
    state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))

    def one():
        nonlocal state, metrics
        state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))

    times = timed(one, n_steps)
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s,
            "first_loss": first_loss, "times": times}


# ----------------------------------------------------------------------------------------------- main


def r(x: float, n: int = 4) -> float:
    return round(float(x), n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measure (after warm-up)")
    ap.add_argument("--mfu-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rm-prompts", type=int, default=8)
    ap.add_argument("--skip", nargs="*", default=[], choices=["sft", "mfu", "rm"])
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch
    import transformers

    t_start = time.perf_counter()
    result = dict(benchmark="train", device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                  n_devices=jax.device_count(), platform=platform.platform(), cpu_count=os.cpu_count(),
                  jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                  torch_threads=torch.get_num_threads(), dtype="float32",
                  # Other processes on the machine skew every number: the 1-min load average before and after.
                  load_average_start=r(os.getloadavg()[0], 2),
                  optim=dict(lr=OPTIM.lr, b1=OPTIM.b1, b2=OPTIM.b2, eps=OPTIM.eps, grad_clip=OPTIM.grad_clip,
                             weight_decay=OPTIM.weight_decay, schedule=OPTIM.schedule))

    if "sft" not in args.skip:
        params = jax.device_get(init_params(make_model(TINY), jax.random.key(0)))
        batch = sft_batch(TINY, args.batch, args.seq)
        tokens = args.batch * args.seq
        # PyTorch first: its thread pool then does not compete with a just-finished XLA computation.
        pt = torch_sft(TINY, params, batch, args.steps)
        log(measure="sft_torch", median_s=r(pt["median_s"]), tokens_per_s=r(tokens / pt["median_s"], 1))
        ours = our_sft(TINY, params, batch, args.steps)
        log(measure="sft_ours", median_s=r(ours["median_s"]), tokens_per_s=r(tokens / ours["median_s"], 1))
        result["sft"] = dict(
            model=cfg_json(TINY), n_params=count_params(params), batch=args.batch, seq=args.seq,
            tokens_per_step=tokens, timed_steps=args.steps,
            ours_median_step_s=r(ours["median_s"]), ours_min_step_s=r(ours["min_s"]),
            ours_tokens_per_s=r(tokens / ours["median_s"], 1), ours_compile_s=r(ours["compile_s"], 2),
            torch_median_step_s=r(pt["median_s"]), torch_min_step_s=r(pt["min_s"]),
            torch_tokens_per_s=r(tokens / pt["median_s"], 1), torch_first_step_s=r(pt["first_step_s"], 3),
            torch_attn_implementation=pt["attn_implementation"],
            speedup=r(pt["median_s"] / ours["median_s"], 3), target_speedup=1.1,
            target_met=bool(pt["median_s"] / ours["median_s"] >= 1.1),
            # Same weights, same tokens: the first-step losses must agree (a check that both train one model).
            ours_first_loss=r(ours["first_loss"], 5), torch_first_loss=r(pt["first_loss"], 5),
            ours_step_times_s=[r(t) for t in ours["times"]], torch_step_times_s=[r(t) for t in pt["times"]])
        log(measure="sft", speedup=result["sft"]["speedup"], first_loss=[result["sft"]["ours_first_loss"],
                                                                         result["sft"]["torch_first_loss"]])

    if "mfu" not in args.skip:
        peak = matmul_peak()
        log(measure="matmul_peak", gflops=r(peak["flops_per_s"] / 1e9, 1), median_s=r(peak["median_s"]))
        params = jax.device_get(init_params(make_model(MFU_MODEL), jax.random.key(0)))
        batch = sft_batch(MFU_MODEL, args.batch, args.seq)
        flops, n_nonembed = model_flops_per_step(MFU_MODEL, params, args.batch, args.seq)
        ours = our_sft(MFU_MODEL, params, batch, args.mfu_steps)
        model_fps = flops / ours["median_s"]
        mfu = model_fps / peak["flops_per_s"]
        peak_after = matmul_peak()  # again, after the step: the peak must not drift (thermal, other load)
        result["mfu"] = dict(
            model=cfg_json(MFU_MODEL), n_params=count_params(params), n_params_nonembedding_plus_head=n_nonembed,
            batch=args.batch, seq=args.seq, tokens_per_step=args.batch * args.seq, timed_steps=args.mfu_steps,
            model_flops_per_step=flops, median_step_s=r(ours["median_s"]), min_step_s=r(ours["min_s"]),
            compile_s=r(ours["compile_s"], 2), model_gflops_per_s=r(model_fps / 1e9, 2),
            matmul_peak=dict(n=peak["n"], median_s=r(peak["median_s"]), gflops_per_s=r(peak["flops_per_s"] / 1e9, 2),
                             best_gflops_per_s=r(peak["best_flops_per_s"] / 1e9, 2),
                             gflops_per_s_after=r(peak_after["flops_per_s"] / 1e9, 2)),
            mfu=r(mfu), mfu_vs_best_peak=r(model_fps / max(peak["best_flops_per_s"], peak_after["best_flops_per_s"])),
            target_mfu=0.55, target_met=bool(mfu >= 0.55), step_times_s=[r(t) for t in ours["times"]])
        log(measure="mfu", mfu=result["mfu"]["mfu"], model_gflops=result["mfu"]["model_gflops_per_s"],
            peak_gflops=result["mfu"]["matmul_peak"]["gflops_per_s"], step_s=r(ours["median_s"]))

    if "rm" not in args.skip:
        B, K, P, R = args.rm_prompts, 4, 64, 64
        model = make_model(TINY, head="scalar")
        params = jax.device_get(init_params(model, jax.random.key(0)))
        optimizer = steps.make_optimizer(OPTIM, 1000)
        schedule = steps.lr_schedule(OPTIM, 1000)
        kway = rm_batch(TINY, B, K, P, R)
        pairs = pairwise_batch(kway)
        comparisons = B * K * (K - 1) // 2
        ours = time_rm(functools.partial(steps.rm_step, model=model, optimizer=optimizer, schedule=schedule),
                       params, optimizer, kway, args.steps)
        log(measure="rm_ours", median_s=r(ours["median_s"]), comparisons_per_s=r(comparisons / ours["median_s"], 1))
        base = time_rm(functools.partial(pairwise_step, model=model, optimizer=optimizer, schedule=schedule),
                       params, optimizer, pairs, args.steps)
        log(measure="rm_pairwise", median_s=r(base["median_s"]), comparisons_per_s=r(comparisons / base["median_s"], 1))
        ratio = base["median_s"] / ours["median_s"]
        result["rm"] = dict(
            model=cfg_json(TINY), head="scalar", prompts=B, K=K, prompt_len=P, response_len=R,
            comparisons_per_step=comparisons, timed_steps=args.steps,
            ours_sequences_per_step=B * K, pairwise_sequences_per_step=2 * comparisons,
            ours_median_step_s=r(ours["median_s"]), ours_comparisons_per_s=r(comparisons / ours["median_s"], 1),
            ours_compile_s=r(ours["compile_s"], 2),
            pairwise_median_step_s=r(base["median_s"]), pairwise_comparisons_per_s=r(comparisons / base["median_s"], 1),
            pairwise_compile_s=r(base["compile_s"], 2),
            speedup=r(ratio, 3), target_speedup=2.5, target_met=bool(ratio >= 2.5),
            # Same pairs, same weights: the K-way loss (mean over prompts of the mean over their 6 pairs) equals
            # the pairwise mean when every prompt has all 6 pairs.
            ours_first_loss=r(ours["first_loss"], 5), pairwise_first_loss=r(base["first_loss"], 5),
            ours_step_times_s=[r(t) for t in ours["times"]], pairwise_step_times_s=[r(t) for t in base["times"]])
        log(measure="rm", speedup=result["rm"]["speedup"])

    result["load_average_end"] = r(os.getloadavg()[0], 2)
    result["total_s"] = r(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
