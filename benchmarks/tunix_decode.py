"""Decode throughput of Google Tunix's sampler (tunix.generate.sampler.Sampler) on the tiny Llama of
benchmarks/decode.py, for a side-by-side comparison.

Runs in its own environment (see benchmarks/requirements-tunix.txt), never imports rlhf_jax:

  python3 -m venv .venv-tunix && .venv-tunix/bin/pip install -r benchmarks/requirements-tunix.txt
  .venv-tunix/bin/python benchmarks/tunix_decode.py --batch 16 --new-tokens 64 --repeats 3

Tunix's own Llama3 (tunix.models.llama3) with the tiny config of benchmarks/decode.py: vocab 2048, d 256,
4 layers, 4 heads of 64, 2 KV heads, MLP 688, untied embeddings, float32, on a mesh over the default devices
(`--model`: another config's fields as JSON, as benchmarks/decode.py passes its other Llama shapes).
`batch` prompts of `--prompt` (64) random ids (2..2047; no BOS, no padding, so exactly that many tokens),
`new_tokens` drawn at `--temperature` (0.7) from the whole vocabulary (top_p 1 and no top_k: Tunix's plain
categorical draw, no sort), with a KV cache of exactly prompt + new tokens. The EOS id is the vocabulary's size,
outside it, so no row stops early; the pad id is -1, so a drawn 0 is not taken for padding. Every reply checks
that each row got `new_tokens` tokens.

A generate call is one call of the sampler's public `__call__` (prompts in as id strings, as its API takes them,
tokens out), timed to its return: `generate_s` is the median over `repeats` calls, after one untimed call with
the same shapes (compilation). `core_s` times only the device work of such a call (the sampling state, the
jitted prefill and decode loop, until its token buffer is ready) without the call's host-side tokenizing,
post-processing and detokenizing.

With `--serve` (how benchmarks/decode.py drives it, alternating with its own measurements) the script builds the
model, prints one JSON line ({"ready": true, ...}), then reads requests "batch new_tokens repeats", one per line
of stdin, and for each prints one JSON line with its warm-up and timed calls, until it reads "0" or stdin ends.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType

from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama3

from tunix_ppo import IdTokenizer  # the PPO comparison's tokenizer of decimal ids

PAD = -1  # not a token id; the EOS id is the vocabulary's size, not one either
TINY = {"num_layers": 4, "vocab_size": 2048, "embed_dim": 256, "hidden_dim": 688, "num_heads": 4, "head_dim": 64,
        "num_kv_heads": 2, "rope_theta": 10000, "norm_eps": 1e-5, "weight_tying": False}


class Bench:
    """Tunix's Llama3 at the tiny shapes and one Sampler per cache size (prompt + new tokens)."""

    def __init__(self, seed: int, prompt: int, temperature: float, model: dict):
        self.prompt, self.temperature = prompt, temperature
        self.cfg = llama3.ModelConfig(**model)
        devices = jax.devices()
        self.mesh = jax.make_mesh((len(devices), 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
        with jax.set_mesh(self.mesh):
            self.model = llama3.Llama3(self.cfg, rngs=nnx.Rngs(seed))
        self.samplers = {}
        self.settings = {"framework": f"tunix {_version('google-tunix')}", "jax": jax.__version__,
                         "device": devices[0].device_kind, "devices": len(devices), "prompt": prompt,
                         "temperature": temperature, "dtype": "float32", "model": model,
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def sampler(self, new_tokens: int) -> sampler_lib.Sampler:
        if new_tokens not in self.samplers:
            cache = sampler_lib.CacheConfig(cache_size=self.prompt + new_tokens, num_layers=self.cfg.num_layers,
                                            num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim)
            self.samplers[new_tokens] = sampler_lib.Sampler(self.model, IdTokenizer(PAD, self.cfg.vocab_size), cache)
        return self.samplers[new_tokens]

    def measure(self, batch: int, new_tokens: int, repeats: int) -> dict:
        sampler = self.sampler(new_tokens)
        ids_BP = np.random.default_rng(0).integers(2, self.cfg.vocab_size, (batch, self.prompt))
        prompts = [" ".join(map(str, row)) for row in ids_BP]
        # No top_k and top_p 1: a plain categorical draw over the vocabulary, as the other samplers do.
        call = lambda seed: sampler(prompts, max_generation_steps=new_tokens, max_prompt_length=self.prompt,
                                    echo=False, eos_tokens=[self.cfg.vocab_size], temperature=self.temperature,
                                    top_p=1.0, top_k=None, seed=seed)
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            out = call(0)
            compile_s = time.perf_counter() - t0
            lengths = [len(t) for t in out.tokens]
            if min(lengths) != new_tokens or max(lengths) != new_tokens:
                raise SystemExit(f"Tunix generated {min(lengths)}..{max(lengths)} tokens per row, not {new_tokens}")
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                call(r + 1)
                times.append(time.perf_counter() - t0)
            core = [self._core(sampler, ids_BP, new_tokens, r + 1) for r in range(repeats)]
        seconds = statistics.median(times)
        core_s = statistics.median(core)
        return {**self.settings, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
                "new_tokens_per_row": [min(lengths), max(lengths)], "compile_s": round(compile_s, 2),
                "generate_s": round(seconds, 5), "tokens_per_s": round(batch * new_tokens / seconds, 1),
                "ms_per_step": round(1000 * seconds / new_tokens, 3), "core_s": round(core_s, 5),
                "core_tokens_per_s": round(batch * new_tokens / core_s, 1)}

    def _core(self, sampler, ids_BP, new_tokens: int, seed: int) -> float:
        """Seconds of the device work of one generate call: what `Sampler.__call__` runs between tokenizing the
        prompts and reading the tokens back (the jitted functions already compiled by a public call)."""
        t0 = time.perf_counter()
        state = sampler.init_sample_state(jax.numpy.asarray(ids_BP, jax.numpy.int32),
                                          total_sampling_steps=self.prompt + new_tokens, include_logits=False,
                                          forbidden_token_ids=None, temperature=self.temperature, top_p=1.0, top_k=None,
                                          seed=jax.random.PRNGKey(seed), beam_size=None)
        state = sampler._compiled_prefill_fn(sampler._flattened_transformer_state, state, None, echo=False)
        state = sampler._compiled_decode_fn(sampler._flattened_transformer_state, state)
        state.token_buffer.block_until_ready()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls (the median is reported)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="answer 'batch new_tokens repeats' lines from stdin")
    ap.add_argument("--model", default=json.dumps(TINY), help="llama3.ModelConfig's fields as JSON (default: tiny)")
    args = ap.parse_args()
    bench = Bench(args.seed, args.prompt, args.temperature, json.loads(args.model))
    if not args.serve:
        print(json.dumps(bench.measure(args.batch, args.new_tokens, args.repeats)), flush=True)
        return
    print(json.dumps({"ready": True, **bench.settings}), flush=True)
    for line in sys.stdin:
        fields = [int(x) for x in line.split()]
        if not fields:
            continue
        if fields[0] <= 0:
            return
        batch, new_tokens, repeats = fields
        print(json.dumps(bench.measure(batch, new_tokens, repeats)), flush=True)


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
