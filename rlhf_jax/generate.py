"""Batch text generation from a HF or rlhf_jax checkpoint with the jit-compiled, mesh-sharded sampler.

  python -m rlhf_jax.generate --model DIR_OR_CKPT --prompt-file FILE --max-new-tokens N --temperature T \
      [--top-k K --top-p P --seed S --batch-size B] --output jsonl

A prompt file holds one prompt per line, or for prompts with line breaks, JSONL lines {"prompt": "..."}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from rlhf_jax import distributed, sharding
from rlhf_jax.errors import UserError, naming_flags, report
from rlhf_jax.checkpoint import LoadedModel, load_model
from rlhf_jax.model import make_model, param_logical_axes
from rlhf_jax.progress import progress as progress_bar
from rlhf_jax.sampling import SamplingParams, sample
from rlhf_jax.tokenizer import PAD_ID, PromptEncoder, load_tokenizer


class PromptFileError(UserError):
    """A prompt file that cannot be read."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl file ({"prompt": ...} per line)."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"{path}: {e.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    prompts = []
    for n, line in enumerate(lines, 1):
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptFileError(f'{path}:{n}: expected an object with a string "prompt" field')
            line = row["prompt"]
        if not line.strip():
            raise PromptFileError(f"{path}:{n}: empty prompt")
        prompts.append(line)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


class Generator:
    """Holds a model placed on a mesh and one compiled sampler for fixed (batch, prompt, new-token) shapes."""

    def __init__(self, loaded: LoadedModel, mesh, params: SamplingParams, dtype: str = "float32",
                 chat_template: bool = False):
        if loaded.head != "lm":
            raise UserError("generation needs a language-model checkpoint, got a scalar-head (reward/value) one")
        if loaded.tokenizer_dir is None:  # callers load with need_tokenizer=True, which names the path
            raise UserError("the checkpoint has no tokenizer files")
        self.cfg = loaded.cfg
        self.mesh = mesh
        self.model = make_model(loaded.cfg, dtype=dtype)
        self.tokenizer = load_tokenizer(loaded.tokenizer_dir)
        self.chat_template = chat_template  # as the model was trained: prompts are encoded the same way
        eos = params.eos_ids or loaded.cfg.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.params_cfg = dataclasses.replace(params, eos_ids=tuple(i for i in eos if i is not None))
        # Inference stores weights in the compute dtype, so the decode loop never re-casts them.
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), loaded.params)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        param_sh = sharding.param_shardings(param_logical_axes(self.model), shapes, mesh)
        for warning in sharding.sharding_report(param_logical_axes(self.model), shapes, mesh).fallbacks:
            print(warning, file=sys.stderr)  # a replicated dimension costs memory: never silently
        self.params = sharding.place(params, param_sh)
        batch_sh = self.batch_sh = sharding.batch_sharding(mesh)
        self._sample = jax.jit(functools.partial(sample, self.model, p=self.params_cfg),
                               in_shardings=(param_sh, batch_sh, batch_sh, sharding.replicated(mesh)),
                               out_shardings=batch_sh)

    def generate(self, prompts: Sequence[str], batch_size: int, max_prompt_tokens: int, seed: int = 0,
                 progress: bool = True) -> Iterator[dict]:
        """One record per prompt, in order: prompt, prompt_ids, ids (EOS kept, padding dropped), text, logprobs."""
        sharding.check_batch_size(batch_size, self.mesh, "batch_size")
        ids_all, mask_all = PromptEncoder(self.tokenizer, max_prompt_tokens, self.chat_template).batch(prompts)
        width = ids_all.shape[1]  # one prompt width for the whole file: one compilation
        if width + self.params_cfg.max_new_tokens > self.cfg.max_position_embeddings:
            raise UserError(f"prompt ({width}) + new tokens ({self.params_cfg.max_new_tokens}) exceed the model's "
                             f"{self.cfg.max_position_embeddings} positions")
        rng = jax.random.key(seed)
        bar = progress_bar(len(prompts), "generate", "prompt", enabled=progress and distributed.is_primary())
        for start in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - start)
            ids = np.full((batch_size, width), PAD_ID, np.int32)
            mask = np.zeros((batch_size, width), bool)
            ids[:n], mask[:n] = ids_all[start:start + n], mask_all[start:start + n]
            mask[n:, -1] = True  # filler rows keep one real token so every row is well defined
            t0 = time.perf_counter()
            out = distributed.to_host(self._sample(self.params, *sharding.place((ids, mask), (self.batch_sh,) * 2),
                                                   jax.random.fold_in(rng, start)))
            new_tokens = int(out.mask_BN[:n].sum())
            bar.update(n)
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
            for row in range(n):
                keep = out.mask_BN[row]
                gen_ids = out.tokens_BN[row][keep].tolist()
                yield {"prompt": prompts[start + row], "prompt_ids": ids[row][mask[row]].tolist(), "ids": gen_ids,
                       "text": self.tokenizer.decode(gen_ids, skip_special_tokens=True),
                       "logprobs": [round(float(x), 6) for x in out.logprobs_BN[row][keep]]}
        bar.close()


def parse_mesh_shape(text: str) -> list[int]:
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3:
        raise UserError(f"--mesh-shape expects 3 comma-separated ints (data,fsdp,tensor), got {text!r}")
    return shape


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse the first out-of-range flag by name, before any model loads (written `not ok` so NaN fails too)."""
    checks = [("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
              ("--temperature", math.isfinite(args.temperature) and args.temperature >= 0, "must be finite and >= 0"),
              ("--top-k", args.top_k >= 0, "must be >= 0"),
              ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1]"),
              ("--batch-size", args.batch_size >= 1, "must be >= 1"),
              ("--max-prompt-tokens", args.max_prompt_tokens >= 1, "must be >= 1")]
    for flag, ok, requirement in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UserError(f"{flag} {requirement}, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint dir or rlhf_jax model checkpoint dir")
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--chat-template", action="store_true",
                    help="wrap each prompt in the tokenizer's chat template (as data.chat_template in training)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--mesh-shape", default="-1,1,1", help="devices per (data, fsdp, tensor) axis")
    ap.add_argument("--output", choices=["jsonl", "text"], default="jsonl", help="what to print per prompt")
    args = ap.parse_args(argv)
    try:
        _check_flags(args)
        mesh = sharding.make_mesh(parse_mesh_shape(args.mesh_shape), ("data", "fsdp", "tensor"))
        prompts = read_prompts(args.prompt_file)
        gen = Generator(load_model(args.model, need_tokenizer=True), mesh,
                        SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, pad_id=PAD_ID),
                        args.dtype, args.chat_template)
        for record in gen.generate(prompts, args.batch_size, args.max_prompt_tokens, args.seed):
            print(json.dumps(record) if args.output == "jsonl" else record["text"], flush=True)
    except UserError as e:
        return report(naming_flags(e, {"batch_size": "--batch-size", "mesh.shape": "--mesh-shape"},
                                   [("--model", args.model), ("--prompt-file", args.prompt_file)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
