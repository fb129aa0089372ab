"""What bounds a decode step on this machine: chains of matmuls with few rows (a decode step's batch) by the
weights of the tiny benchmark model's MLP (256 -> 1376 -> 256, float32), with the weights either resident in the
caches (one pair, 2.8 MB) or streamed from memory (`--streamed-pairs` distinct pairs in turn, 45 MB by default:
more than the last-level cache, 32 MB on the 2-core machine of `small_matmuls_cpu.json`).

  python benchmarks/small_matmuls.py --out benchmarks/results/small_matmuls_cpu.json

Per row count: microseconds per matmul, GFLOP/s and the weight bytes read per second, for both working sets, in XLA
(`xla`) and beside it in PyTorch (`torch`, the same chains eagerly; skipped where torch is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from report import emit, measured_env  # benchmarks/report.py

D, F = 256, 1376  # the tiny benchmark model's width and fused gate/up width
MATMULS_PER_CALL = 800


def weights(rows: int, pairs: int):
    """x_MD and `pairs` (W_DF, W_FD) pairs, as numpy arrays (each pair its own array: no slicing copies)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    return normal(rows, D), [(normal(D, F), normal(F, D) * 0.01) for _ in range(pairs)]


def xla_chain(x_MD, pairs):
    """A call that runs MATMULS_PER_CALL matmuls, x_MD @ W_DF then @ W_FD over the pairs in turn, jitted."""
    @jax.jit
    def run(x_MD, pairs):
        def body(_, x_MD):
            for up_DF, down_FD in pairs:  # tanh keeps the values bounded and the chain dependent
                x_MD = jnp.tanh(jnp.dot(jnp.dot(x_MD, up_DF, precision="highest"), down_FD, precision="highest"))
            return x_MD
        return jax.lax.fori_loop(0, MATMULS_PER_CALL // (2 * len(pairs)), body, x_MD)

    x_MD, pairs = jax.device_put((x_MD, pairs))
    return lambda: run(x_MD, pairs).block_until_ready()


def torch_chain(x_MD, pairs):
    """The same chain in PyTorch, eagerly."""
    import torch

    x_MD = torch.from_numpy(x_MD)
    pairs = [(torch.from_numpy(up), torch.from_numpy(down)) for up, down in pairs]

    def run():
        x = x_MD
        with torch.inference_mode():
            for _ in range(MATMULS_PER_CALL // (2 * len(pairs))):
                for up_DF, down_FD in pairs:
                    x = torch.tanh(x @ up_DF @ down_FD)
        return x
    return run


def timed(run, rows: int, pairs: int, repeats: int) -> dict:
    """Median time of one matmul over `repeats` calls of `run` (after one untimed)."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    per_matmul_s = statistics.median(times) / MATMULS_PER_CALL
    return {"weights_mb": round(pairs * 2 * D * F * 4 / 1e6, 1), "us_per_matmul": round(per_matmul_s * 1e6, 1),
            "gflops": round(2 * rows * D * F / per_matmul_s / 1e9, 1),
            "weight_gbps": round(D * F * 4 / per_matmul_s / 1e9, 1)}


def measure(rows: int, pairs: int, repeats: int, with_torch: bool) -> dict:
    x_MD, weight_pairs = weights(rows, pairs)
    chains = {"xla": xla_chain, **({"torch": torch_chain} if with_torch else {})}
    return {name: timed(chain(x_MD, weight_pairs), rows, pairs, repeats) for name, chain in chains.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--streamed-pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    with_torch = not args.skip_torch and importlib.util.find_spec("torch") is not None
    results = [{"rows": m, "cached": measure(m, 1, args.repeats, with_torch),
                "streamed": measure(m, args.streamed_pairs, args.repeats, with_torch)} for m in args.rows]
    result = {"benchmark": "small_matmuls", "device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "shape": {"d": D, "f": F, "dtype": "float32"},
              "env": measured_env(), "results": results}
    if with_torch:
        import torch

        result.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    emit(result, args.out)


if __name__ == "__main__":
    main()
