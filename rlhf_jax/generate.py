"""Batch text generation from a HF or rlhf_jax checkpoint with the jit-compiled, mesh-sharded sampler.

  python -m rlhf_jax.generate --model DIR_OR_CKPT --prompt-file FILE --max-new-tokens N --temperature T \\
      [--top-k K --top-p P --seed S --batch-size B] --output jsonl

A prompt file holds one prompt per line, or for prompts with line breaks, JSONL lines {"prompt": "..."}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from rlhf_jax.config import MIN_TEMPERATURE
from rlhf_jax.errors import UserError, naming_flags, out_of_memory_in_one_line, report
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.generation import Generator, mesh_shape_as_one, parse_mesh_shape, read_prompts
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.tokenizer import PAD_ID
from rlhf_jax.runtime import sharding


# The config keys errors name, as the flags that set them here.
FLAGS = {"sampling.batch_size": "--batch-size", "mesh.shape": "--mesh-shape", "data.chat_template": "--chat-template",
         **{f"sampling.{k}": f"--{k.replace('_', '-')}" for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                                   "max_prompt_tokens")}}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse the first out-of-range flag by name, before any model loads (written `not ok` so NaN fails too)."""
    checks = [("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
              ("--temperature", args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf,
               f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}"),
              ("--top-k", args.top_k >= 0, "must be >= 0"),
              ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1]"),
              ("--batch-size", args.batch_size >= 1, "must be >= 1"),
              ("--seed", 0 <= args.seed < 2 ** 32, "must be from 0 to 2^32 - 1"),
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
    args = ap.parse_args(mesh_shape_as_one(sys.argv[1:] if argv is None else argv))
    try:
        _check_flags(args)
        mesh = sharding.make_mesh(parse_mesh_shape(args.mesh_shape), ("data", "fsdp", "tensor"))
        sharding.check_batch_size(args.batch_size, mesh, "sampling.batch_size")  # before a model loads
        prompts = read_prompts(args.prompt_file)
        with out_of_memory_in_one_line("a smaller --batch-size or --max-new-tokens, or --dtype bfloat16, needs less"):
            gen = Generator(load_model(args.model, need_tokenizer=True), mesh,
                            SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                           pad_id=PAD_ID), args.dtype, args.chat_template, where=str(args.model))
            for record in gen.generate(prompts, args.batch_size, args.max_prompt_tokens, args.seed):
                print(json.dumps(record) if args.output == "jsonl" else record["text"], flush=True)
    except BrokenPipeError:  # the reader stopped (`| head`): the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except UserError as e:
        return report(naming_flags(e, FLAGS,
                                   [("--model", args.model), ("--prompt-file", args.prompt_file)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
