"""rlhf_jax: the InstructGPT recipe in JAX.

  python -m rlhf_jax.main --config configs/demo.yaml [section.key=value ...]

Without --config the defaults run: stage generate with the tiny built-in model on the bundled prompts.

Stages (config key `stage`):
  generate   sample completions for a prompt file from a HF or rlhf_jax checkpoint (the tiny built-in model
             when model.path is empty) with the compiled, mesh-sharded sampler; writes JSONL samples.
  sft        fine-tune a language model on (prompt, demonstration) pairs (data.name: an sft dataset).
  rm         train a reward model on rankings, all the comparisons of a prompt in one batch element
             (data.name: a rankings dataset; model.path: usually the sft export); then fit its normalisation.
  ppo        optimise the policy (model.path) against ppo.reward_model with a per-token KL penalty to it and
             a value model from the reward model (data.name: a prompts dataset); one compiled program per
             iteration; exports export/ (policy) and export_value/.
  dpo        optimise the policy on rankings directly (DPO's sigmoid loss, IPO, label smoothing), against a
             frozen reference.
  grpo, rloo optimise the policy on groups of its own samples per prompt, scored by a reward model or a
             reward function (grpo.reward_function: MODULE:FUNCTION), advantages relative to the group.
  eval       compare policies (eval.policies) with a reference on held-out prompts: reward-model and gold win
             rates, KL, RM accuracy; writes report.json, report.md and plots (also python -m rlhf_jax.evaluate).
  task       generate a bundled task's datasets and base model (the demo's first step).
  prepare    import a dataset (as python -m rlhf_jax.data does), as a pipeline step.
  label      sample K responses per prompt from one or more policies and have them ranked by a programmatic
             labeler (label.labeler) or by people on a served web page (label.labeler: people), as a
             rankings dataset for the rm stage.
A config with a `pipeline:` mapping runs several stages in order, each in run_dir/NAME, skipping those finished
(see rlhf_jax/pipeline.py and configs/demo.yaml).
Training stages write metrics.jsonl, TensorBoard events, Orbax checkpoints (rerun the same command to resume),
best/ (lowest eval loss) and export/ (the final params-only model for the next stage or convert --to-hf).
Datasets are prepared with `python -m rlhf_jax.data --help`.

  python -m rlhf_jax.main --config CFG [overrides] --dry-run [--device-memory GIB] [--peak-tflops T]
plans memory before launch: compiles each training step (sft, rm, dpo, ppo, grpo, rloo; every such step of a
pipeline) for its mesh on abstract inputs, reading only the models' model.json / config.json and writing
nothing, and prints per device the arguments, outputs, temporaries and total memory, the FLOPs per step and the
least step time at the peak; a step that does not fit gets the largest micro-batch (optim.grad_accum_steps) and
model.remat that fit. Device memory and peak default to the device's (none on CPU: without --device-memory there
is no verdict). See rlhf_jax/plan/.

  python -m rlhf_jax.main --config CFG [overrides] --check
validates the config (every step of a pipeline) as a run would before its first step, reading no data or models
and compiling nothing, and prints its stages; the launchers run it before they start or create anything.

Exit status: 0 done (a dry run: everything fits, or no verdict); 2 a user error (one `error:` line); 3 diverged
(non-finite loss, gradient or parameters; nothing non-finite is saved); 4 interrupted by SIGTERM/SIGINT after
saving (rerun the same command to resume); 5 a step does not fit the device memory (found by a dry run, or
out of memory in a run: the line says how to plan a fit).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

from rlhf_jax import pipeline
from rlhf_jax.config import config_help, load_config
from rlhf_jax.errors import (Interrupted, UserError, lost_processes_in_one_line, os_error_message,
                             out_of_memory_in_one_line, report)
from rlhf_jax.runtime import cpu_memory
from rlhf_jax.runtime.signals import exit_process, sigterm_as_ctrl_c


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.main", add_help=False)
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="plan memory and step time; run nothing")
    ap.add_argument("--check", action="store_true", help="validate the config; run nothing")
    ap.add_argument("--device-memory", metavar="GIB", help="memory per device for the dry run's verdict")
    ap.add_argument("--peak-tflops", metavar="T", help="peak TFLOP/s per device for the dry run's step times")
    args, overrides = ap.parse_known_args(argv)
    if args.help:
        print(__doc__ + "\n" + config_help())
        return 0
    try:
        with sigterm_as_ctrl_c():
            return _run(args, overrides)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a training loop (which saves and stops on its own)
        return report(Interrupted("interrupted outside a training step (loading, compiling, sampling or writing): "
                                  "what was saved before stays; rerun the same command to resume"))


def _run(args, overrides: Sequence[str]) -> int:
    try:
        bad = [o for o in overrides if o.startswith("-")]
        if bad:
            raise UserError(f"unknown option {bad[0]!r}; overrides are written section.key=value")
        if args.check:
            return _check(args.config, overrides)
        if args.dry_run or args.device_memory is not None or args.peak_tflops is not None:
            return _dry_run(args, overrides)
        if pipeline.is_pipeline(args.config):
            with out_of_memory_in_one_line(), lost_processes_in_one_line():
                pipeline.run(args.config, overrides)
            return 0
        cfg = load_config(args.config, overrides)
        if args.config is None and not overrides:
            print(f"no --config: running the defaults, stage {cfg.stage!r} with the tiny built-in model on the "
                  f"bundled prompts into {cfg.run_dir}/ (--help lists the stages; make demo runs the whole recipe)",
                  file=sys.stderr)
        from rlhf_jax.stages import dispatch as stages  # after validation: config errors come before any heavy import or compile

        with out_of_memory_in_one_line(), lost_processes_in_one_line():
            stages.run(cfg)
    except UserError as e:
        return report(e)
    except OSError as e:  # a full disk or an unwritable path met anywhere: still one line, naming the path
        return report(UserError(os_error_message(e)))
    return 0


def _check(path: str | None, overrides: Sequence[str]) -> int:
    """--check: what a run validates before its first step, with nothing run, read or written."""
    if pipeline.is_pipeline(path):
        _, steps = pipeline.load(path, overrides)
    else:
        cfg = load_config(path, overrides)
        from rlhf_jax.stages import dispatch as stages  # after validation: config errors come before any heavy import

        stages.check(cfg)
        steps = [pipeline.Step(cfg.stage, cfg)]
    names = (s.name if s.name == s.cfg.stage else f"{s.name} ({s.cfg.stage})" for s in steps)
    print(f"{path or 'the defaults'}: config OK: " + ", ".join(names))
    return 0


def _dry_run(args, overrides: Sequence[str]) -> int:
    """--dry-run: the config (every step of a pipeline) validated first, then planned by rlhf_jax/plan/."""
    if not args.dry_run:
        raise UserError("--device-memory and --peak-tflops go with --dry-run")
    limits = {}
    for flag, value in (("--device-memory", args.device_memory), ("--peak-tflops", args.peak_tflops)):
        try:
            limits[flag] = None if value is None else float(value)
        except ValueError:
            raise UserError(f"{flag} {value!r}: expected a number") from None
        if limits[flag] is not None and not 0 < limits[flag] < math.inf:
            raise UserError(f"{flag} {value!r}: must be a finite number > 0")
    is_pipeline = pipeline.is_pipeline(args.config)
    if is_pipeline:
        _, steps = pipeline.load(args.config, overrides)
    else:
        cfg = load_config(args.config, overrides)
        steps = [pipeline.Step(cfg.stage, cfg)]
    from rlhf_jax import plan  # after validation: config errors come before any heavy import
    from rlhf_jax.runtime import distributed

    distributed.initialize(steps[0].cfg.distributed)  # on a pod: plan for the whole slice's devices
    return plan.dry_run(steps, is_pipeline, args.config, limits["--device-memory"], limits["--peak-tflops"])


if __name__ == "__main__":
    cpu_memory.keep_freed_memory()  # before XLA allocates its first step (see rlhf_jax/runtime/cpu_memory.py)
    exit_process(main())
