"""bf16 training-pass throughput of the two attention paths side by side: cuDNN fused attention (`attention=auto`
on an NVIDIA GPU) against the einsum with float32 scores, on a mid-size random Llama with left-padded rows.

  python benchmarks/attention.py --out benchmarks/results/attention_gpu.json

Each configuration times a jitted value-and-grad of the next-token loss (what an SFT/RM/PPO step computes) and
reports tokens/s; the max abs logit difference between the paths is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax.models.transformer import PAD_ID, ModelConfig, forward, init_params, make_model  # noqa: E402

from report import emit  # noqa: E402  benchmarks/report.py


def _loss_fn(model, ids, mask):
    def loss(params):
        logp = jax.nn.log_softmax(forward(model, params, ids, mask)[:, :-1], -1)
        picked = jnp.take_along_axis(logp, jnp.maximum(ids[:, 1:], 0)[..., None], -1)[..., 0]
        return -jnp.where(mask[:, 1:], picked, 0.0).sum() / mask[:, 1:].sum()
    return loss


def bench(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                          init_params(make_model(cfg), jax.random.key(0))))()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32)
    pad = rng.integers(0, seq // 4, batch)
    mask = np.arange(seq)[None, :] >= pad[:, None]
    ids = jnp.asarray(np.where(mask, ids, PAD_ID))
    mask = jnp.asarray(mask)
    out = {"batch": batch, "seq": seq, "real_tokens": int(mask.sum())}
    logits = {}
    for name in ("auto", "einsum"):
        model = make_model(cfg, dtype="bfloat16", param_dtype="bfloat16", attention=name)
        step = jax.jit(jax.value_and_grad(_loss_fn(model, ids, mask)))
        jax.block_until_ready(step(params))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params))
            times.append(time.perf_counter() - t0)
        hlo = step.lower(params).as_text()
        logits[name] = np.asarray(jax.jit(lambda p: forward(model, p, ids, mask))(params))
        out[name] = {"step_ms": round(1000 * float(np.median(times)), 2),
                     "tokens_per_s": round(batch * seq / float(np.median(times))),
                     "uses_cudnn": "__cudnn$fmha" in hlo}
    real = np.asarray(mask)
    out["max_abs_logit_diff"] = float(np.abs(logits["auto"] - logits["einsum"])[real].max())
    out["speedup"] = round(out["einsum"]["step_ms"] / out["auto"]["step_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a tiny model (a CPU smoke run)")
    args = ap.parse_args()
    if args.small:
        cfg = ModelConfig(family="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, d_ff=128, max_position_embeddings=512)
        shapes = [(2, 64)]
    else:  # about 0.5B parameters: 8 layers of a Llama-1B-like width with grouped-query attention
        cfg = ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=8,
                          head_dim=128, d_ff=5632, max_position_embeddings=4096)
        shapes = [(8, 1024), (4, 2048)]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "config": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim")},
               "runs": []}
    for batch, seq in shapes:
        results["runs"].append(bench(cfg, batch, seq, args.repeats))
        print(json.dumps(results["runs"][-1]), flush=True)
    emit(results, args.out)


if __name__ == "__main__":
    main()
