"""The dry run's printed table: one row per planned step with its memory per device, FLOPs per step per device,
the least step time at the peak rate and the verdict."""

from __future__ import annotations

from typing import Sequence

from rlhf_jax.config import Config
from rlhf_jax.plan.devices import Budget, gib
from rlhf_jax.plan.planner import StagePlan


def si(flops: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g}"


def seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def table(plans: Sequence[StagePlan], cfgs: dict[str, Config], b: Budget) -> list[str]:
    """One row per step: memory per device, FLOPs per step per device, the least step time, the verdict; with
    LoRA steps, the lora column and the total of the same step in full fine-tuning beside it."""
    with_lora = any(p.full_finetuning is not None for p in plans)
    head = ("step", "stage", "batch", "accum", "remat", *(("lora",) if with_lora else ()), "arguments", "outputs",
            "temps", "aliased", "total", *(("full FT",) if with_lora else ()), "FLOPs", "time >=", "fits")
    rows = [head]
    for p in plans:
        if p.measured is None:
            continue
        cfg, f = cfgs[p.step], p.measured.footprint
        peak = b.peak.get(cfg.model.dtype)
        lora = (f"r{cfg.lora.rank}" if cfg.lora.rank else "-",) if with_lora else ()
        full = ((gib(p.full_finetuning.total) if p.full_finetuning is not None else "-",) if with_lora else ())
        rows.append((p.step, p.stage, p.batch, str(cfg.optim.grad_accum_steps), cfg.model.remat, *lora,
                     gib(f.arguments), gib(f.outputs), gib(f.temporaries), gib(f.aliased), gib(f.total), *full,
                     si(p.measured.flops), seconds(p.measured.flops / peak) if peak else "-",
                     "-" if p.fits is None else ("yes" if p.fits else "NO")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = {0, 1, 2, 4, 5} if with_lora else {0, 1, 2, 4}
    render = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = ["per device, per step:"] + [render(r) for r in rows] if len(rows) > 1 else []
    lines += [f"{p.step} ({p.stage}): not planned (only the training steps are: sft, rm, dpo, ppo, grpo, rloo)"
              for p in plans if p.measured is None]
    return lines
