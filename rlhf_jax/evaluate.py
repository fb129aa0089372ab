"""Evaluation of policies the way InstructGPT judged them: on the same held-out prompts and sampling seeds, how
often each policy's response is preferred to the reference's (by the reward model, and by a programmatic gold
scorer when there is one), how far it moved from the reference (KL on its own samples), and how well the reward
model orders held-out rankings.

  python -m rlhf_jax.evaluate --policy runs/ppo/export [more ...] --reference runs/sft/export \\
      --reward-model runs/rm/export --prompts data/prompts[:SPLIT] --out runs/eval \\
      [--rankings data/rankings[:SPLIT]] [--gold MODULE:FUNCTION] [--step N | --all-steps] [--runs DIR ...]

A policy is a model directory (export/, best/, a HF dir) or a training run directory (sft, dpo, ppo, grpo,
rloo): its latest checkpoint, `--step N`, or every saved step with `--all-steps`. Writes report.json, report.md
and PNG plots to --out. The same options are the `eval` section of a config for `stage: eval`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rlhf_jax.config import Config, config_from_dict
from rlhf_jax.errors import UserError, naming_flags, out_of_memory_in_one_line, report
from rlhf_jax.models.generation import mesh_shape_as_one, parse_mesh_shape


def config_from_flags(args: argparse.Namespace) -> Config:
    return config_from_dict({
        "stage": "eval", "run_dir": args.out, "seed": args.seed,
        "mesh": {"shape": parse_mesh_shape(args.mesh_shape)},
        "model": {"dtype": args.dtype}, "data": {"chat_template": args.chat_template},
        "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                     "top_p": args.top_p, "batch_size": args.batch_size, "max_prompt_tokens": args.max_prompt_tokens},
        "eval": {"policies": args.policy, "reference": args.reference, "reward_model": args.reward_model,
                 "prompts": args.prompts, "rankings": args.rankings, "gold": args.gold, "step": args.step,
                 "all_steps": args.all_steps, "limit": args.limit, "samples": args.samples, "runs": args.runs,
                 "out": args.out}})


# The config keys config_from_flags fills, as the flags that set them: errors name what the user typed.
FLAGS = {"run_dir": "--out", "eval.out": "--out", "seed": "--seed", "mesh.shape": "--mesh-shape",
         "eval.reference": "--reference", "eval.reward_model": "--reward-model",
         "model.dtype": "--dtype", "data.chat_template": "--chat-template",
         **{f"sampling.{k}": f"--{k.replace('_', '-')}" for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                                   "batch_size", "max_prompt_tokens")},
         "eval.policies": "--policy", "eval.reference": "--reference", "eval.reward_model": "--reward-model",
         **{f"eval.{k}": f"--{k.replace('_', '-')}" for k in ("prompts", "rankings", "gold", "step", "all_steps",
                                                               "limit", "samples", "runs")}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", nargs="+", required=True, help="policies: model dirs or sft/dpo/ppo/grpo/rloo run dirs")
    ap.add_argument("--reference", required=True, help="the baseline policy (e.g. the sft export)")
    ap.add_argument("--reward-model", default="", help="a reward model export (optional with --gold)")
    ap.add_argument("--prompts", required=True, help="prompt file, or prepared prompts dataset DIR[:SPLIT]")
    ap.add_argument("--rankings", default="", help="prepared rankings dataset DIR[:SPLIT] for RM accuracy")
    ap.add_argument("--gold", default="", help="MODULE:FUNCTION, f(prompts, responses) -> scores")
    ap.add_argument("--step", type=int, default=0, help="checkpoint step of run dirs (default: latest)")
    ap.add_argument("--all-steps", action="store_true", help="every saved step of run dirs")
    ap.add_argument("--runs", nargs="*", default=[], help="run dirs whose training curves are plotted")
    ap.add_argument("--out", required=True, help="report directory")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only")
    ap.add_argument("--samples", type=int, default=4, help="prompts shown in report.md")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--mesh-shape", default="-1,1,1", help="devices per (data, fsdp, tensor) axis")
    args = ap.parse_args(mesh_shape_as_one(sys.argv[1:] if argv is None else argv))
    try:
        from rlhf_jax.stages import dispatch as stages

        with out_of_memory_in_one_line("a smaller --batch-size or --max-new-tokens, or --dtype bfloat16, needs less"):
            stages.run(config_from_flags(args))
    except UserError as e:
        return report(naming_flags(e, FLAGS, [("--out", args.out), ("--reward-model", args.reward_model),
                                              ("--reference", args.reference), ("--prompts", args.prompts),
                                              ("--rankings", args.rankings),
                                              *(("--policy", p) for p in args.policy)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
