"""Decode throughput: our scanned, KV-cached sampler against transformers' `generate` (PyTorch, KV cache) on
the same Llama weights (`--model-size`: tiny, smollm2-135m or 1b), and against Google Tunix's sampler on its own
Llama3 at the same shapes, in one run. Prints one JSON document.

  python benchmarks/decode.py [--model-size tiny] [--batches 16 64] [--new-tokens 64 128] [--rounds 3] [--repeats 1]
                              [--skip-transformers] [--tunix-python .venv-tunix/bin/python] [--out FILE]

Tunix runs benchmarks/tunix_decode.py in its own interpreter, `--tunix-python` (default `.venv-tunix/bin/python`
when it exists, created as the docstring of benchmarks/ppo.py says; otherwise Tunix is skipped with a note in the
JSON): built once before any timing, then for each (batch, new tokens) it times `--repeats` calls of
`tunix.generate.sampler.Sampler` after an untimed one, while this process waits. Tunix is timed on CPU only;
its weights are its own random initialisation (the cost of decoding does not depend on them).

Each contender is compiled and warmed up at every (batch, new tokens) first. Then `--rounds` times, for each
(batch, new tokens) in turn: `--repeats` calls of transformers, of ours, of Tunix's; so load from other processes
and this machine's drifting speed fall on all three alike. Each time is the median over every timed call (Tunix:
over its rounds' medians); `speedup_by_round` and `speedup_vs_tunix_by_round` keep each round's ratio.
`tunix_tokens_per_s` counts whole `Sampler.__call__`s (id strings in, tokens out, as its API takes them);
`tunix_core_tokens_per_s` only their device work (sampling state, jitted prefill and decode loop).

Each row also has the memory roofline of a step: `memory_bound_ms_per_step`, the least bytes a step reads (every
weight, bar the input embedding's rows unless the head is tied, and the keys and values of the slots filled so far,
averaged over the steps) over the bandwidth of an elementwise pass measured in the same run (`memory_gbps`, bytes
read plus written), and `ours_fraction_of_memory_bound`. On an accelerator at batch 128 that is the HBM roofline of
benchmarks/gpu_check.sh. `decode_segments`: the loops the sampler decodes in (one below 256 decode steps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlhf_jax.models import hf  # noqa: E402
from rlhf_jax.models.sampling import SamplingParams, decode_segments, sample  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model  # noqa: E402

from ppo import SMOLLM2_135M, tunix_llama3_fields  # noqa: E402  benchmarks/ppo.py
from report import emit  # noqa: E402

CONFIGS = {
    # The CPU reference point: the tiny Llama of the foundation issue.
    "tiny": ModelConfig(family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=64, d_ff=688, max_position_embeddings=1024, eos_token_ids=(), bos_token_id=0),
    # An accelerator-sized model (TinyLlama-1.1B shapes).
    "1b": ModelConfig(family="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                      head_dim=64, d_ff=5632, max_position_embeddings=2048, eos_token_ids=(), bos_token_id=0),
    # A real small model that this CPU decodes at batch 64.
    "smollm2-135m": SMOLLM2_135M,
}

ROOT = Path(__file__).resolve().parent.parent


class TunixPeer:
    """benchmarks/tunix_decode.py --serve in the Tunix interpreter: the constructor waits until its model is built;
    `measure(batch, new_tokens, repeats)` then times Tunix's sampler there, this process waiting, and returns its
    JSON line."""

    def __init__(self, python: str, args: list[str]):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / "tunix_decode.py"), "--serve", *args],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.ready = self._reply()

    def measure(self, batch: int, new_tokens: int, repeats: int) -> dict:
        self.proc.stdin.write(f"{batch} {new_tokens} {repeats}\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        raise RuntimeError(f"tunix_decode.py ended ({self.proc.wait()}): {self.log.read()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF ends its request loop
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def compile_ours(model, params, ids, mask, new_tokens, temperature):
    """(a call of our jitted sampler on these prompts, a new seed each call; the seconds its first call took)."""
    p = SamplingParams(max_new_tokens=new_tokens, temperature=temperature)
    fn = jax.jit(lambda pr, i, m, r: sample(model, pr, i, m, r, p).tokens_BN)
    seeds = itertools.count()
    call = lambda: fn(params, ids, mask, jax.random.key(next(seeds))).block_until_ready()
    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


def timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def memory_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes per second the device moves in a jitted elementwise pass over `nbytes` (each byte read and written)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda v: v * 0.5, donate_argnums=0)  # in place: no fresh output buffer to map every call
    x = f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def decode_bytes_per_step(cfg: ModelConfig, params, batch: int, prompt: int, new_tokens: int, dtype: str) -> float:
    """The least a decode step reads: every weight but the input embedding (a step looks up `batch` rows of it;
    a tied head reads it whole) and the keys and values of the slots filled so far, on average over the steps."""
    n_weights = sum(x.size for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        n_weights -= params["embed"].size
    kv_per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    return jnp.dtype(dtype).itemsize * (n_weights + batch * (prompt + new_tokens / 2) * kv_per_slot)


def transformers_generate(torch_model, ids, new_tokens, temperature):
    """A call of transformers' `generate` on these prompts (the KV cache on, exactly `new_tokens` tokens)."""
    import torch

    input_ids = torch.tensor(ids, dtype=torch.long, device=torch_model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=temperature > 0,
                  temperature=temperature, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))

    def call():
        with torch.inference_mode():
            torch_model.generate(input_ids, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return call


def decode_row(case: dict, config: ModelConfig, params, args, bandwidth: float, with_tunix: bool) -> dict:
    """One (batch, new tokens)'s JSON row from its contenders' timed calls, round by round."""
    batch, n = case["batch"], case["new_tokens"]
    median = lambda rounds: statistics.median(t for times in rounds for t in times)
    by_round = lambda theirs, ours: [round(statistics.median(t) / statistics.median(o), 3)
                                     for t, o in zip(theirs, ours)]
    ours_s = median(case["ours"])
    row = dict(batch=batch, prompt=args.prompt, new_tokens=n, ours_tokens_per_s=round(batch * n / ours_s, 1),
               ours_ms_per_step=round(1000 * ours_s / n, 3), ours_compile_s=round(case["ours_compile_s"], 2),
               decode_segments=len(decode_segments(n - 1)))
    bound_s = decode_bytes_per_step(config, params, batch, args.prompt, n, args.dtype) / bandwidth
    row.update(memory_bound_ms_per_step=round(1000 * bound_s, 3),
               ours_fraction_of_memory_bound=round(bound_s * n / ours_s, 3))
    if case["transformers"]:
        hf_s = median(case["transformers"])
        row.update(transformers_tokens_per_s=round(batch * n / hf_s, 1),
                   transformers_ms_per_step=round(1000 * hf_s / n, 3), speedup=round(hf_s / ours_s, 3),
                   speedup_by_round=by_round(case["transformers"], case["ours"]))
    if with_tunix and case["tunix"]:
        generate_s = statistics.median(t["generate_s"] for t in case["tunix"])
        core_s = statistics.median(t["core_s"] for t in case["tunix"])
        row.update(tunix_tokens_per_s=round(batch * n / generate_s, 1),
                   tunix_ms_per_step=round(1000 * generate_s / n, 3), speedup_vs_tunix=round(generate_s / ours_s, 3),
                   speedup_vs_tunix_by_round=by_round([[t["generate_s"]] for t in case["tunix"]], case["ours"]),
                   tunix_core_tokens_per_s=round(batch * n / core_s, 1), tunix_compile_s=case["tunix_compile_s"])
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls of each contender per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the three contenders")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model-size", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--torch-device", default="cpu", help="where transformers runs: cpu or cuda")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto",
                    help="the layers as one scan (auto: above 8 layers, as model.scan_layers does); a scanned decode "
                         "step reads each layer's weights through a dynamic slice")
    default_tunix = ROOT / ".venv-tunix" / "bin" / "python"
    ap.add_argument("--tunix-python", default=str(default_tunix) if default_tunix.exists() else "",
                    help="interpreter of the Tunix environment ('' skips Tunix)")
    ap.add_argument("--out")
    args = ap.parse_args()

    config = CONFIGS[args.model_size]
    scan = {"auto": None, "on": True, "off": False}[args.scan_layers]
    model = make_model(config, dtype=args.dtype, scan_layers=scan)
    params = jax.device_get(init_params(model, jax.random.key(0)))
    torch_model = None
    if not args.skip_transformers:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as d:
            hf.save_hf(d, params, config)
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=getattr(torch, args.dtype)).to(args.torch_device).eval()
        torch_threads = torch.get_num_threads()
    # Inference keeps weights in the compute dtype: no per-step cast of float32 weights inside the loop.
    params = jax.device_put(jax.tree.map(lambda x: x.astype(args.dtype), params))
    on_cpu = jax.devices()[0].platform == "cpu"
    bandwidth = memory_bandwidth(2**28 if on_cpu else 2**30)
    tunix_python = args.tunix_python if on_cpu else ""
    tunix_note = "" if tunix_python else (
        "Tunix skipped: its sampler is timed on CPU only" if not on_cpu else
        "Tunix skipped: --tunix-python ''" if default_tunix.exists() else
        f"Tunix skipped: no {default_tunix.relative_to(ROOT)} (see the docstring of benchmarks/ppo.py to create it)")
    if tunix_python and not Path(tunix_python).exists():
        tunix_note, tunix_python = f"Tunix skipped: {tunix_python} does not exist", ""
    tunix = None
    if tunix_python:
        try:
            tunix = TunixPeer(tunix_python, ["--prompt", str(args.prompt), "--temperature", str(args.temperature),
                                             "--model", json.dumps(tunix_llama3_fields(config))])
        except RuntimeError as e:
            tunix_note = f"Tunix failed: {e}"
    tunix_settings = tunix.ready if tunix else None
    cases = []  # one per (batch, new tokens): each contender's call and timings
    try:
        for batch in args.batches:
            ids = np.random.default_rng(0).integers(1, config.vocab_size, (batch, args.prompt)).astype(np.int32)
            mask = np.ones_like(ids, bool)
            for n in args.new_tokens:
                case = dict(batch=batch, new_tokens=n, ours=[], transformers=[], tunix=[])
                if torch_model is not None:
                    case["transformers_call"] = transformers_generate(torch_model, ids, n, args.temperature)
                    case["transformers_call"]()  # warm-up
                case["ours_call"], case["ours_compile_s"] = compile_ours(model, params, ids, mask, n, args.temperature)
                cases.append(case)
        if tunix is not None:  # its compiling calls, before any timing
            try:
                for case in cases:
                    case["tunix_compile_s"] = tunix.measure(case["batch"], case["new_tokens"], 1)["compile_s"]
            except RuntimeError as e:
                tunix.close()
                tunix_note, tunix = f"Tunix failed: {e}", None
        for _ in range(args.rounds):
            for case in cases:
                # transformers first: its thread pool then does not compete with a just-finished XLA computation
                if torch_model is not None:
                    case["transformers"].append(timed(case["transformers_call"], args.repeats))
                case["ours"].append(timed(case["ours_call"], args.repeats))
                if tunix is not None:
                    # Its untimed call comes first there, so our just-finished computation does not overlap its timing.
                    try:
                        case["tunix"].append(tunix.measure(case["batch"], case["new_tokens"], args.repeats))
                    except RuntimeError as e:
                        tunix.close()
                        tunix_note, tunix = f"Tunix failed: {e}", None
    finally:
        if tunix is not None:
            tunix.close()
    rows = [decode_row(case, config, params, args, bandwidth, with_tunix=tunix is not None) for case in cases]
    # Per-token time as the generated length doubles (1.0 = flat).
    growth = {}
    for batch in args.batches:
        steps = {r["new_tokens"]: r["ours_ms_per_step"] for r in rows if r["batch"] == batch}
        ns = sorted(steps)
        if len(ns) > 1:
            growth[f"batch_{batch}_ours_{ns[0]}_to_{ns[-1]}"] = round(steps[ns[-1]] / steps[ns[0]], 3)
    result = dict(benchmark="decode", model_size=args.model_size, scan_layers=model.scan_layers,
                  model=config.__dict__ | {"eos_token_ids": []}, dtype=args.dtype, temperature=args.temperature,
                  device=str(jax.devices()[0].device_kind), torch_device=args.torch_device,
                  platform=platform.platform(), cpu_count=os.cpu_count(), jax=jax.__version__,
                  torch_threads=None if torch_model is None else torch_threads,
                  memory_gbps=round(bandwidth / 1e9, 1), results=rows,
                  per_token_time_growth=growth)
    if tunix_settings and all("tunix_tokens_per_s" in r for r in rows):
        result["tunix"] = {k: v for k, v in tunix_settings.items() if k != "ready"}
    else:
        result["tunix_note"] = tunix_note
    emit(result, args.out)


if __name__ == "__main__":
    main()
