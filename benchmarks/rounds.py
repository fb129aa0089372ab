"""What a second round of labeling, reward modelling and PPO buys on the demo task: a finished run of
configs/demo_rounds.yaml (run it first: python -m rlhf_jax.main --config configs/demo_rounds.yaml) -> each
round's gold score and KL, and how well each round's reward model orders held-out rankings of the samples of
round 1's PPO policy (the labels of round 2 alone, which the round-1 reward model never saw).

    python benchmarks/rounds.py --run runs/demo_rounds --out benchmarks/results/demo_rounds_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_jax.data.prepare import prepare  # noqa: E402
from rlhf_jax.data.pipeline import open_split, stored_prompts  # noqa: E402

from report import emit  # noqa: E402  benchmarks/report.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run_dir of configs/demo_rounds.yaml")
    parser.add_argument("--out", required=True, help="JSON results file")
    args = parser.parse_args()
    run = Path(args.run)
    report = json.loads((run / "round2" / "eval" / "report.json").read_text())
    data = run / "data"
    held_out = stored_prompts(open_split(str(data), "prompts", "eval")[0], 0)
    with tempfile.TemporaryDirectory() as tmp:
        # round 2's labels alone: rankings of round 1's PPO samples, held out by the same prompts as every round
        prepare("jsonl_rankings", [str(run / "round2" / "label" / "rankings.jsonl")], tmp, "round2_only",
                eval_prompts=set(held_out))
        accuracy = {f"round{r}_rm": _rm_accuracy(run / f"round{r}" / "rm" / "export", Path(tmp) / "round2_only",
                                                  run, Path(tmp) / f"eval{r}") for r in (1, 2)}
    rounds = [{"round": i, **{k: r[k] for k in ("gold_score_mean", "score_mean", "kl", "rm_accuracy")}}
              for i, r in enumerate(report["rounds"], 1)]
    result = {"run": str(run), "rounds": rounds,
              "rm_accuracy_on_round1_policy_samples": accuracy,
              "gold_round2_at_least_round1": rounds[1]["gold_score_mean"] >= rounds[0]["gold_score_mean"],
              "round2_rm_at_least_round1_rm": accuracy["round2_rm"] >= accuracy["round1_rm"]}
    emit(result, args.out)


def _rm_accuracy(reward_model: Path, rankings: Path, run: Path, out: Path) -> float:
    """The evaluation CLI's RM accuracy on the held-out split of `rankings` (one short policy evaluation with it)."""
    subprocess.run([sys.executable, "-m", "rlhf_jax.evaluate", "--policy", str(run / "sft" / "export"),
                    "--reference", str(run / "sft" / "export"), "--reward-model", str(reward_model),
                    "--prompts", str(run / "data" / "prompts:eval"), "--rankings", f"{rankings}:eval",
                    "--limit", "64", "--out", str(out)], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())["rm_accuracy"]


if __name__ == "__main__":
    main()
