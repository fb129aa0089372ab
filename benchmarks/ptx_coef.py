"""PPO-ptx's coefficient on the demo task: the demo's PPO step rerun with several `ppo.ptx_coef` values (the
pretraining corpus as `ppo.ptx_dataset`) from a finished demo run, each policy evaluated against SFT by the
gold reward. InstructGPT's 27.8 was for its own loss scaling; here the LM loss is a per-token mean and the
advantages are whitened, so the gradients of the two terms have other sizes. Prints JSON.

    python benchmarks/ptx_coef.py --demo-run runs/demo --out benchmarks/results/ptx_coef_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's rlhf_jax
from rlhf_jax import pipeline  # noqa: E402
from rlhf_jax.stages import dispatch as stages  # noqa: E402

from report import emit  # noqa: E402  benchmarks/report.py


def _step(steps, name):
    return next(step.cfg for step in steps if step.name == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-run", required=True, help="a finished run of configs/demo.yaml")
    ap.add_argument("--coefs", default="0,0.1,1,27.8")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    demo = Path(args.demo_run).resolve()
    _, steps = pipeline.load(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                             [f"run_dir={demo}"])
    ppo_cfg, eval_cfg = _step(steps, "ppo"), _step(steps, "eval")
    rows = []
    for coef in [float(c) for c in args.coefs.split(",")]:
        run_dir = demo.parent / f"{demo.name}_ptx_{coef:g}"
        ppo = dataclasses.replace(ppo_cfg.ppo, ptx_coef=coef, ptx_dataset="corpus" if coef else "")
        began = time.perf_counter()
        summary = stages.run(dataclasses.replace(ppo_cfg, run_dir=str(run_dir), ppo=ppo))
        seconds = time.perf_counter() - began
        ev = dataclasses.replace(eval_cfg.eval, policies=(str(run_dir / "export"),), runs=(), out=str(run_dir / "eval"))
        report = stages.run(dataclasses.replace(eval_cfg, run_dir=str(run_dir / "eval"), eval=ev))
        (policy,) = json.loads((run_dir / "eval" / "report.json").read_text())["policies"]
        rows.append({"ptx_coef": coef, "ppo_seconds": round(seconds, 1),
                     **{f"last_{k}": summary.get(k) for k in ("score_mean", "kl", "ptx_loss", "policy_grad_norm")},
                     **{f"eval_{k}": policy[k] for k in ("gold_score_mean", "gold_win_rate", "win_rate", "kl")},
                     "verdict": report.get("verdict")})
        print(json.dumps(rows[-1]), flush=True)
    result = {"demo_run": str(demo), "rows": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
