"""Writes an evaluation's outputs: report.json, report.md, a few small PNG plots; and terminal headline lines.

Every file is written whole (to a temporary name beside it, then renamed), so a reader never sees half a file.
matplotlib is imported only when a plot is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from rlhf_jax.runtime.fsio import write_bytes_atomically

# Training curves drawn from run directories: (panel title, stage, metric key, held-out metric key or None).
CURVES = (
    ("SFT loss", "sft", "loss", "eval_loss"),
    ("RM accuracy", "rm", "accuracy", "eval_accuracy"),
    ("PPO score", "ppo", "score_mean", None),
    ("PPO KL", "ppo", "kl", None),
    ("PPO entropy", "ppo", "entropy", None),
    ("DPO loss", "dpo", "loss", "eval_loss"),
    ("DPO reward accuracy", "dpo", "reward_accuracy", "eval_reward_accuracy"),
    ("GRPO reward", "grpo", "reward_mean", None),
    ("GRPO KL", "grpo", "kl", None),
    ("RLOO reward", "rloo", "reward_mean", None),
    ("RLOO KL", "rloo", "kl", None),
)
PLOT_TITLES = {"score_kl_by_step.png": "RM score and KL by checkpoint step",
               "gold_vs_kl.png": "Gold score against KL to the reference",
               "rounds.png": "Gold score, RM score, KL and RM accuracy per round",
               "training_curves.png": "Training curves"}
NONE = "–"  # a table cell with no value


PLOTS = ("score_kl_by_step.png", "gold_vs_kl.png", "rounds.png", "training_curves.png")


def write_report(out_dir: Path, report: dict, samples: list[dict], runs: Sequence[Path] = ()) -> list[Path]:
    """Writes report.json, the plots that apply, and report.md (which embeds them) into `out_dir`; returns the
    paths written. Run directories in `runs` whose metrics.jsonl is missing or unreadable are skipped with a
    one-line warning on stderr."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_bytes_atomically(out_dir / "report.json", (json.dumps(_plain(report), indent=2) + "\n").encode())]
    plots = []
    if any(len(run) >= 2 for run in _runs_of(report["policies"]).values()) and _has_rm(report):
        plots.append(write_bytes_atomically(out_dir / "score_kl_by_step.png", _score_kl_by_step_png(report)))
    if _has_gold(report):
        plots.append(write_bytes_atomically(out_dir / "gold_vs_kl.png", _gold_vs_kl_png(report)))
    if report.get("rounds"):
        plots.append(write_bytes_atomically(out_dir / "rounds.png", _rounds_png(report["rounds"])))
    curves = _read_runs(runs)
    if curves:
        plots.append(write_bytes_atomically(out_dir / "training_curves.png", _training_curves_png(curves)))
    for stale in set(PLOTS) - {p.name for p in plots}:  # an earlier evaluation's, which this one does not make
        (out_dir / stale).unlink(missing_ok=True)
    markdown = markdown_report(report, samples, [p.name for p in plots])
    written += plots
    written.append(write_bytes_atomically(out_dir / "report.md", markdown.encode()))
    return written


def headline(report: dict) -> list[str]:
    """One line per policy for the terminal: win rate vs the reference (by RM score, and gold when scored), KL."""
    lines = []
    for p in report["policies"]:
        parts = []
        if p.get("win_rate") is not None:
            parts.append(f"win rate {_rate_ci(p['win_rate'], p['win_rate_ci'])} vs reference by RM score")
        if p.get("gold_win_rate") is not None:
            parts.append(f"gold win rate {_rate_ci(p['gold_win_rate'], p.get('gold_win_rate_ci'))}")
        parts[0] = f"{p['name']}: {parts[0]}"
        parts.append(f"KL {_num(p.get('kl'), 2)} nats")
        lines.append(", ".join(parts))
    return lines


def verdict(report: dict) -> list[str]:
    """In words: did the last policy improve on the reference, and by how much. Judged by the gold scorer's win
    rate when there is one (else the reward model's): improved when its 95% interval lies above one half,
    worse when below, no clear change otherwise."""
    p, ref = report["policies"][-1], report["reference"]
    gold = p.get("gold_win_rate") is not None
    rate, ci = (p["gold_win_rate"], p["gold_win_rate_ci"]) if gold else (p["win_rate"], p["win_rate_ci"])
    judge = "the gold reward" if gold else "the reward model, no gold scorer given"
    if ci[0] > 0.5:
        outcome = "RLHF improved the policy"
    elif ci[1] < 0.5:
        outcome = "RLHF made the policy worse"
    else:
        outcome = "RLHF made no clear difference to the policy"
    lines = [f"{outcome}: on {report['prompts']} held-out prompts {p['name']}'s response beats the reference's "
             f"{100 * rate:.0f}% of the time by {judge} (95% CI {100 * ci[0]:.0f}-{100 * ci[1]:.0f}%, ties half)."]
    # the reward model's rate where the headline is the gold scorer's (else it is the headline)
    details = [f"By the reward model it wins {100 * p['win_rate']:.0f}%"] if gold and p.get("win_rate") is not None \
        else []
    if gold:
        details.append(f"the gold score goes from {ref['gold_score_mean']:.2f} to {p['gold_score_mean']:.2f}")
    unfiltered = "" if report.get("kl_of_sampled_distributions", True) else \
        " (of the unfiltered distributions: the responses were drawn greedily or filtered)"
    kl = f"at a KL of {p['kl']:.2f} nats from the reference{unfiltered}"
    if p["kl"] < 0:  # the k1 estimate of a policy close to its reference can fall below 0; a KL never does
        kl = (f"at a KL near 0 nats from the reference (the sampled estimate is {p['kl']:.2f}; k3, never negative: "
              f"{p.get('kl_k3') or 0:.3f}){unfiltered}")
    lines.append(f"{'; '.join(details)}, {kl}." if details else f"It is {kl}.")
    lines[-1] = lines[-1][0].upper() + lines[-1][1:]
    if report.get("rm_accuracy") is not None:
        ceiling = report.get("labeler_ceiling")
        lines.append(f"The reward model orders {100 * report['rm_accuracy']:.1f}% of held-out labeled pairs "
                     "correctly" + (f" (the labeler's ceiling: {100 * ceiling:.1f}%)." if ceiling is not None
                                    else "."))
    return lines


# ---------------------------------------------------------------------------------------------------- markdown


def markdown_report(report: dict, samples: list[dict], plot_names: Sequence[str] = ()) -> str:
    """The report.md text: settings, the headline table, the plots `plot_names` (files beside it), samples."""
    ref = report["reference"]
    scorer = f"reward model `{report['reward_model']}`, " if report.get("reward_model") else ""
    settings = f"{report.get('prompts')} prompts, seed {report.get('seed')}, {scorer}reference `{ref.get('path')}`"
    settings += f", gold scorer `{report['gold']}`." if report.get("gold") else "."
    lines = ["# Policy evaluation", "", settings, ""]
    if report.get("sampling"):
        lines += ["Sampling: " + ", ".join(f"{k}={v}" for k, v in report["sampling"].items()) + ".", ""]
    lines += _headline_table(report) + [""] + verdict(report) + [""]
    if report.get("rm_accuracy") is not None:
        ceiling = report.get("labeler_ceiling")
        against = f" (the labeler's ceiling: {_num(ceiling)})" if ceiling is not None else ""
        lines += [f"Reward model accuracy on held-out preference pairs: {_num(report['rm_accuracy'])}{against}.", ""]
    if report.get("labeler_agreement") is not None:  # people labeled: how often two of them order a pair alike
        lines += [f"Labelers agree on {_num(report['labeler_agreement'])} of the response pairs they both ranked "
                  "(InstructGPT's training labelers: 0.726).", ""]
    if report.get("rounds"):
        lines += ["## Rounds", ""] + _table(
            ["round", "gold score", "RM score", "KL", "RM accuracy"],
            [[i, _num(r["gold_score_mean"]), _num(r["score_mean"]), _num(r["kl"]), _num(r["rm_accuracy"])]
             for i, r in enumerate(report["rounds"], 1)]) + [""]
    for name in plot_names:
        lines += [f"![{PLOT_TITLES.get(name, name)}]({name})", ""]
    if samples:
        lines += ["## Samples", ""]
        for i, sample in enumerate(samples, 1):
            lines += _sample_block(i, sample, has_gold=_has_gold(report))
    return "\n".join(lines).rstrip("\n") + "\n"


def _headline_table(report: dict) -> list[str]:
    policies, ref = report["policies"], report["reference"]
    gold = _has_gold(report)
    per_policy_acc = any(p.get("rm_accuracy") is not None for p in policies)
    rm = _has_rm(report)
    header = ["Policy", "Step"] + (["RM score", "Win rate vs reference"] if rm else [])
    header += ["Gold score", "Gold win rate"] if gold else []
    header += ["KL (nats)", "KL k3", "Response length", "EOS rate"] + (["RM accuracy"] if per_policy_acc else [])
    rows = []
    for p in policies:
        row = [p["name"], p.get("step")]
        row += [_mean_std(p.get("score_mean"), p.get("score_std")), _rate_ci(p.get("win_rate"), p.get("win_rate_ci"))
                ] if rm else []
        if gold:
            row += [_num(p.get("gold_score_mean")), _rate_ci(p.get("gold_win_rate"), p.get("gold_win_rate_ci"))]
        row += [_num(p.get("kl")), _num(p.get("kl_k3")), _num(p.get("response_length"), 1), _num(p.get("eos_rate"))]
        rows.append(row + ([_num(p.get("rm_accuracy"))] if per_policy_acc else []))
    # The reference against itself: KL 0 and no win rate.
    row = ["reference", None] + ([_mean_std(ref.get("score_mean"), ref.get("score_std")), None] if rm else [])
    row += [_num(ref.get("gold_score_mean")), None] if gold else []
    row += [_num(0.0), _num(0.0), _num(ref.get("response_length"), 1), _num(ref.get("eos_rate"))]
    rows.append(row + ([None] if per_policy_acc else []))
    return _table(header, rows)


def _sample_block(i: int, sample: dict, has_gold: bool) -> list[str]:
    gold = has_gold or sample.get("policy_gold") is not None or sample.get("reference_gold") is not None
    rm = sample.get("policy_score") is not None
    header = ["Model", "Response"] + (["RM score"] if rm else []) + (["Gold score"] if gold else [])
    rows = []
    for who, name in (("reference", "reference"), ("policy", sample["policy"])):
        row = [name, sample[f"{who}_response"]] + ([_num(sample.get(f"{who}_score"))] if rm else [])
        rows.append(row + ([_num(sample.get(f"{who}_gold"))] if gold else []))
    return [f"### {i}. {_escape_cell(sample['policy'])}", "", "Prompt:", "", *_fenced(sample["prompt"]), "",
            *_table(header, rows), ""]


def _table(header: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(_escape_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_escape_cell(c) for c in row) + " |" for row in rows]


def _escape_cell(value) -> str:
    """A value as one markdown table cell: a `|` would end the cell, a newline the row, `<` could open HTML."""
    if value is None:
        return NONE
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return text if text.strip() else " "


def _fenced(text: str) -> list[str]:
    """`text` verbatim in a code block whose fence is longer than any run of backticks inside it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _num(value, digits: int = 3) -> str:
    if value is None:
        return NONE
    return f"{value:.{digits}f}"


def _mean_std(mean, std) -> str:
    return NONE if mean is None else f"{mean:.3f} ± {std:.3f}" if std is not None else _num(mean)


def _rate_ci(rate, ci) -> str:
    if rate is None:
        return NONE
    return f"{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else f"{rate:.2f}"


# ---------------------------------------------------------------------------------------------------- json


def _plain(value):
    """`value` as strict JSON data: numpy numbers become Python ones, floats keep 6 significant digits, and a
    non-finite float becomes null (json.dumps would write NaN, which JSON readers refuse)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # a numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------------------------------------------- plots


def _stepped(policies: list[dict]) -> list[dict]:
    return sorted((p for p in policies if p.get("step") is not None), key=lambda p: p["step"])


def _has_rm(report: dict) -> bool:
    """Whether a reward model scored the responses (an evaluation may have the gold scorer alone)."""
    return any(p.get("score_mean") is not None for p in [report["reference"], *report["policies"]])


def _has_gold(report: dict) -> bool:
    return report["reference"].get("gold_score_mean") is not None or any(
        p.get("gold_score_mean") is not None for p in report["policies"])


def _figure(nrows: int = 1, ncols: int = 1, figsize=(6, 4)):
    # Figure without pyplot: no global backend or figure registry, renders with Agg on savefig.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _runs_of(policies: list[dict]) -> dict[str, list[dict]]:
    """The stepped policies by run (their name without @STEP), each run's in step order: one line per run."""
    runs: dict[str, list[dict]] = {}
    for p in _stepped(policies):
        runs.setdefault(p["name"].rsplit("@", 1)[0], []).append(p)
    return runs


def _score_kl_by_step_png(report: dict) -> bytes:
    runs = _runs_of(report["policies"])
    fig, (score_ax, kl_ax) = _figure(1, 2, figsize=(8, 3.5))
    gold_ax = None
    for i, (run, policies) in enumerate(runs.items()):
        steps, marker = [p["step"] for p in policies], "os^vD"[i % 5]
        named = f" ({run})" if len(runs) > 1 else ""
        score_ax.plot(steps, [p["score_mean"] for p in policies], f"{marker}-", color="C0", label=f"RM score{named}")
        gold = [(p["step"], p["gold_score_mean"]) for p in policies if p.get("gold_score_mean") is not None]
        if gold:
            gold_ax = gold_ax or score_ax.twinx()  # the gold scorer has its own scale
            gold_ax.plot(*zip(*gold), f"{marker}--", color="C1", label=f"gold score{named}")
        kl_ax.plot(steps, [p["kl"] for p in policies], f"{marker}-", color="C2", label=run)
    if report["reference"].get("score_mean") is not None:
        score_ax.axhline(report["reference"]["score_mean"], color="C0", ls=":", lw=1, label="reference RM score")
    score_ax.set(xlabel="step", ylabel="RM score", title="Score by checkpoint")
    handles = score_ax.get_legend_handles_labels()
    if gold_ax is not None:
        gold_ax.set_ylabel("gold score")
        more = gold_ax.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    fig.legend(*handles, loc="outside lower center", ncols=3, fontsize="small")  # clear of both axes' points
    kl_ax.set(xlabel="step", ylabel="KL to reference (nats)", title="KL by checkpoint")
    return _png(fig)


def _gold_vs_kl_png(report: dict) -> bytes:
    """Gold score against KL of every evaluated policy: one line per run from the reference through its checkpoints,
    or with rounds one line (a frontier) per round."""
    fig, (ax,) = _figure()
    reference = report["reference"].get("gold_score_mean")
    if report.get("rounds"):
        frontiers = [r["checkpoints"] for r in report["rounds"]]
    else:  # one line per run (its checkpoints), each from the reference: separate runs are no path
        runs: dict = {}
        for p in report["policies"]:
            runs.setdefault(p["name"].rsplit("@", 1)[0], []).append(p)
        frontiers = list(runs.values())
    rounds = bool(report.get("rounds"))
    start = None if reference is None else (0.0, reference, "reference")
    for i, policies in enumerate(frontiers):
        points = [(p["kl"], p["gold_score_mean"], p["name"]) for p in policies
                  if p.get("gold_score_mean") is not None and p.get("kl") is not None]
        if start is not None:
            points.insert(0, start)
        if not rounds:  # the reference too: a k1 estimate of a policy's KL can be below its 0
            points.sort()
        # else in checkpoint order: each round's path from where the round before it ended
        elif policies and policies[-1].get("gold_score_mean") is not None:  # the next round starts at this one's end
            start = (policies[-1]["kl"], policies[-1]["gold_score_mean"], policies[-1]["name"])
        label = f"round {i + 1}" if rounds else None
        ax.plot([k for k, _, _ in points], [g for _, g, _ in points], "o-", color=f"C{i + 1}", label=label)
        if not rounds:
            for kl, gold, name in points:
                if name != "reference" or i == 0:
                    ax.annotate(name, (kl, gold), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if rounds:
        ax.legend(fontsize="small")
    ax.set(xlabel="KL to reference (nats)", ylabel="gold score", title="Gold score against KL")
    return _png(fig)


def _rounds_png(rounds: list[dict]) -> bytes:
    fig, axes = _figure(1, 4, figsize=(12, 3))
    numbers = list(range(1, len(rounds) + 1))
    for ax, (key, title) in zip(axes, (("gold_score_mean", "gold score"), ("score_mean", "RM score (its round's RM)"),
                                       ("kl", "KL to reference (nats)"), ("rm_accuracy", "RM accuracy"))):
        values = [(n, r[key]) for n, r in zip(numbers, rounds) if r.get(key) is not None]
        if values:
            ax.plot(*zip(*values), "o-")
        ax.set(xlabel="round", title=title, xticks=numbers)
    return _png(fig)


def _read_runs(runs: Sequence[Path]) -> dict:
    """{(title, key): {run label: [(step, value), ...]}} for every curve in CURVES that some run has."""
    curves: dict = {}
    names = [Path(run).name for run in runs]
    for run, name in zip(runs, names):
        lines = _read_metrics(Path(run))
        if lines is None:
            continue
        label = name if name and names.count(name) == 1 else str(run)  # the full path only where names clash
        for title, stage, key, eval_key in CURVES:
            for k in (key, eval_key) if eval_key else (key,):
                # null: a value that was not finite (NaN in the plot, a gap)
                points = [(line["step"], math.nan if line[k] is None else float(line[k])) for line in lines
                          if line["stage"] == stage and k in line]
                if points:
                    curves.setdefault((title, key), {})[label + (" (held-out)" if k == eval_key else "")] = points
    return curves


def _read_metrics(run: Path) -> list[dict] | None:
    """The lines of `run`/metrics.jsonl; None (after a one-line warning) when the file is missing or has a line
    that is not a metrics record, since a curve with silently dropped points would mislead."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        _warn(f"run {run}: no metrics.jsonl, left out of the training curves")
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        _warn(f"run {run}: cannot read metrics.jsonl ({type(e).__name__}: {e}), left out of the training curves")
        return None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            line = None
        if not _is_metrics_line(line):
            _warn(f"run {run}: metrics.jsonl line {number} is not a metrics record, run left out of the training "
                  "curves")
            return None
        lines.append(line)
    return lines


def _is_metrics_line(line) -> bool:
    if not isinstance(line, dict) or not isinstance(line.get("stage"), str):
        return False
    if not isinstance(line.get("step"), int) or isinstance(line.get("step"), bool):
        return False
    plotted = {k for _, _, key, eval_key in CURVES for k in (key, eval_key) if k}
    return all(line[k] is None or isinstance(line[k], (int, float)) and not isinstance(line[k], bool)
               for k in plotted & line.keys())


def _training_curves_png(curves: dict) -> bytes:
    ncols = min(len(curves), 3)
    nrows = -(-len(curves) // ncols)
    fig, axes = _figure(nrows, ncols, figsize=(4 * ncols, 3 * nrows))
    for ax, ((title, key), by_run) in zip(axes, curves.items()):
        for label, points in by_run.items():
            style = "o--" if label.endswith("(held-out)") else "-"
            ax.plot(*zip(*points), style, label=label, markersize=3)
        ax.set(title=title, xlabel="step", ylabel=key)  # the metric's name in metrics.jsonl
        ax.legend(fontsize="x-small")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------- files


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
