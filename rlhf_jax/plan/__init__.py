"""Memory planned before launch: `python -m rlhf_jax.main --config CFG [overrides] --dry-run`.

Every training program of the config (the sft, rm and dpo step, with dpo's reference pass when precomputed; the
whole ppo, grpo or rloo iteration; every such step of a pipeline) is built exactly as its stage builds it
(`stages.train.Stage` and `training.state.jit_step`; `stages.ppo`'s builders), lowered on abstract inputs
(jax.ShapeDtypeStruct with the run's shardings, params from jax.eval_shape) and compiled for the configured mesh.
Nothing is allocated on the devices, no weights and no tokenizer are read (only a model's model.json or
config.json) and nothing is written. Per stage it prints the per-device memory of the
compiled program (`compiled.memory_analysis()`: arguments, outputs, temporaries, the outputs aliasing donated
arguments, and the total that must fit), its FLOPs per step per device and the least step time at a peak rate.

FLOPs come from `compiled.cost_analysis()`, which counts the partitioned program of ONE device (per device, not
global) but counts the body of a while loop once; the matmul FLOPs of loop bodies (gradient accumulation, the
sampler, PPO's epochs and minibatches) are therefore recounted from the compiled HLO with each loop's known trip
count.

When a stage does not fit the given device memory, candidates are compiled (model.remat none, then block; with
each optim.grad_accum_steps the batch divides into, fewest first, while the micro-batch still splits over the
data-parallel devices, assuming memory does not grow with the accumulation) and the first that fits is suggested;
the exit status is then `NO_FIT` (5).

The figures are those of the backend the dry run compiles for: simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) give XLA's CPU compiler's buffer assignment, which can differ
from a GPU's or TPU's (other fusion and scheduling; bf16 arithmetic widened to float32 on CPU), so plan on the
target devices for exact numbers. Only the models' architectures are read; a model that a pipeline step will make
(`{run_dir}/sft/export`) is taken to be that step's model, and a missing ppo reward or value model the policy's
architecture with a scalar head.

`dry_run` here runs the package's modules: `devices` (the memory and peak rate measured against), `models` (the
architectures, read or anticipated), `programs` (the abstract programs), `figures` and `flops` (the memory and
FLOPs of a compiled program), `planner` (per step: compile, judge, suggest) and `report` (the printed table).
"""

from __future__ import annotations

import sys
from typing import Sequence

import jax

from rlhf_jax import pipeline
from rlhf_jax.errors import UserError
from rlhf_jax.plan.devices import budget, gib

NO_FIT = 5  # exit status of a dry run in which some stage does not fit the device memory
PLANNED = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")


def dry_run(steps: Sequence[pipeline.Step], is_pipeline: bool, label: str | None, device_memory: float | None = None,
            peak_tflops: float | None = None, out=None) -> int:
    """Plans every training step of validated `steps` (one config's, or a pipeline's) and prints the report;
    returns the exit status: 0 when every planned step fits (or there is no verdict), NO_FIT when one does not."""
    # the programs import every stage and its data libraries: here, not when a module of this package is imported
    from rlhf_jax.plan.planner import Planner, StagePlan
    from rlhf_jax.plan.report import table

    out = out or sys.stdout
    if not is_pipeline:  # a pipeline's steps were checked when it was loaded
        from rlhf_jax.stages import dispatch as stages

        for step in steps:
            stages.check(step.cfg)
    devices = jax.devices()
    b = budget(devices[0], device_memory, peak_tflops)
    planner = Planner(steps, b, is_pipeline, out)
    programs = {}
    for step in steps:  # every step read and checked before anything is compiled
        if step.cfg.stage in PLANNED:
            try:
                programs[step.name] = planner.program(step)
            except UserError as e:
                raise UserError(f"pipeline.{step.name}: {e}" if is_pipeline else str(e)) from None
    print(f"dry run of {label or 'the default config'}: each training step compiled for its mesh on abstract "
          f"inputs ({len(devices)} {devices[0].platform} devices; no parameter allocated, no weights read, nothing "
          "written)", file=out)
    memory = f"{gib(b.memory)} ({b.memory_source})" if b.memory else b.memory_source
    print(f"  device memory: {memory}", file=out)
    print(f"  peak: {b.peak_source}", file=out)
    plans = [planner.plan(programs[s.name]) if s.name in programs else StagePlan(s.name, s.cfg.stage, "", None,
                                                                                  None, []) for s in steps]
    for line in table(plans, {s.name: s.cfg for s in steps}, b):
        print(line if line.startswith("per device") else "  " + line, file=out)
    for p in plans:
        for line in p.lines:
            print(f"  {p.step}: {line}", file=out)
    notes = list(dict.fromkeys(clause for p in plans if p.measured is not None  # each clause once, in order
                               for clause in p.measured.flops_note.split("; ")))
    if notes:
        print(f"  FLOPs per device: XLA's cost analysis ({'; '.join(notes)})", file=out)
        print("  time >= FLOPs / peak: a bound that ignores memory bandwidth (decoding is bandwidth-bound)", file=out)
    if b.memory is None and any(p.measured is not None for p in plans):
        print("no verdict: the device memory is unknown (pass --device-memory GIB)", file=out)
    if any(p.fits is False for p in plans):
        print(f"does not fit: {', '.join(p.step for p in plans if p.fits is False)} (exit status {NO_FIT})", file=out)
        return NO_FIT
    if any(p.fits for p in plans):
        print("every planned step fits", file=out)
    return 0
