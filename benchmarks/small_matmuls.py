"""What bounds a decode step on this machine: chains of matmuls with few rows (a decode step's batch) by the
weights of the tiny benchmark model's MLP (256 -> 1376 -> 256, float32), with the weights either resident in the
caches (one pair, 2.8 MB) or streamed from memory (`--streamed-pairs` distinct pairs in turn, 45 MB by default:
more than the last-level cache, 32 MB on the 2-core machine of `small_matmuls_cpu.json`).

  python benchmarks/small_matmuls.py --out benchmarks/results/small_matmuls_cpu.json

Per row count: microseconds per matmul, GFLOP/s and the weight bytes read per second, for both working sets.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from report import emit, measured_env  # benchmarks/report.py

D, F = 256, 1376  # the tiny benchmark model's width and fused gate/up width
MATMULS_PER_CALL = 800


def chain(rows: int, pairs: int, repeats: int) -> dict:
    """Median time of one matmul in a jitted loop of MATMULS_PER_CALL, x_MD @ W_DF then @ W_FD over `pairs`
    distinct weight pairs in turn (each pair its own argument: no slicing copies)."""
    keys = jax.random.split(jax.random.key(0), 2 * pairs + 1)
    ups = [jax.random.normal(k, (D, F)) for k in keys[:pairs]]
    downs = [jax.random.normal(k, (F, D)) * 0.01 for k in keys[pairs:2 * pairs]]
    x_MD = jax.random.normal(keys[-1], (rows, D))

    @jax.jit
    def run(x_MD, ups, downs):
        def body(_, x_MD):
            for up_DF, down_FD in zip(ups, downs):  # tanh keeps the values bounded and the chain dependent
                x_MD = jnp.tanh(jnp.dot(jnp.dot(x_MD, up_DF, precision="highest"), down_FD, precision="highest"))
            return x_MD
        return jax.lax.fori_loop(0, MATMULS_PER_CALL // (2 * pairs), body, x_MD)

    run(x_MD, ups, downs).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x_MD, ups, downs).block_until_ready()
        times.append(time.perf_counter() - t0)
    per_matmul_s = statistics.median(times) / MATMULS_PER_CALL
    return {"weights_mb": round(pairs * 2 * D * F * 4 / 1e6, 1), "us_per_matmul": round(per_matmul_s * 1e6, 1),
            "gflops": round(2 * rows * D * F / per_matmul_s / 1e9, 1),
            "weight_gbps": round(D * F * 4 / per_matmul_s / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--streamed-pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()
    results = [{"rows": m, "cached": chain(m, 1, args.repeats), "streamed": chain(m, args.streamed_pairs,
                                                                                   args.repeats)}
               for m in args.rows]
    result = {"benchmark": "small_matmuls", "device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "shape": {"d": D, "f": F, "dtype": "float32"},
              "env": measured_env(), "results": results}
    emit(result, args.out)


if __name__ == "__main__":
    main()
