import json
import re
import subprocess
import sys

import numpy as np

from rlhf_jax.eval import report as report_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(gold=True, steps=True):
    policies = []
    for i, (name, step) in enumerate([("ppo@100", 100), ("ppo@200", 200), ("ppo@300", 300)]):
        policies.append({
            "name": name, "path": f"runs/ppo/checkpoints/{step}", "step": step if steps else None,
            "score_mean": 0.5 + i, "score_std": 0.25, "win_rate": 0.625 + 0.125 * i,
            "win_rate_ci": [0.5, min(0.75 + 0.125 * i, 1.0)],
            "gold_score_mean": (0.25 - 0.5 * i) if gold else None, "gold_win_rate": 0.5 if gold else None,
            "gold_win_rate_ci": [0.375, 0.625] if gold else None,
            "kl": 1.5 * (i + 1), "kl_k3": 1.25 * (i + 1), "response_length": 40.5, "eos_rate": 0.875,
            "rm_accuracy": None})
    return {
        "reference": {"path": "runs/sft/best", "score_mean": 0.125, "score_std": 0.5,
                      "gold_score_mean": 0.75 if gold else None, "response_length": 38.0, "eos_rate": 0.9375},
        "reward_model": "runs/rm/best", "prompts": 64, "seed": 7,
        "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64},
        "rm_accuracy": 0.6875, "gold": "gold-rm" if gold else None, "policies": policies}


SAMPLES = [
    {"policy": "ppo@300", "prompt": "Say | and ```code```", "reference_response": "plain answer",
     "policy_response": "a | b\nsecond line <|endoftext|>", "reference_score": 0.5, "policy_score": 1.5,
     "reference_gold": 0.25, "policy_gold": -0.75},
]


def write_run(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def make_runs(tmp_path):
    sft = tmp_path / "runs" / "sft"
    write_run(sft, [{"stage": "sft", "step": s, "time": 0.0, "loss": 3.0 / s} for s in (1, 2, 3, 4)]
              + [{"stage": "sft", "step": 4, "time": 0.0, "eval_loss": 0.9}])
    ppo = tmp_path / "runs" / "ppo"
    write_run(ppo, [{"stage": "ppo", "step": s, "time": 0.0, "score_mean": 0.1 * s, "kl": 0.05 * s,
                     "entropy": 2.0 - 0.1 * s} for s in (1, 2, 3)])
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 2.0}\n{"stage": "sft", "st\n')
    missing = tmp_path / "runs" / "missing"
    missing.mkdir()
    return [sft, ppo, broken, missing]


def cells(row):
    """Cells of a markdown table row, splitting only on unescaped pipes."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def table_after(md, header_start):
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def test_full_report(tmp_path, capsys):
    report = make_report()
    out = tmp_path / "eval"
    written = report_lib.write_report(out, report, SAMPLES, runs=make_runs(tmp_path))

    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"}
    assert all(p.parent == out and p.is_file() for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left behind
    assert json.loads((out / "report.json").read_text()) == report

    for name in ("score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 150_000, name

    md = (out / "report.md").read_text()
    headline = table_after(md, "| Policy")
    width = len(cells(headline[0]))
    assert "Gold score" in headline[0] and "Gold win rate" in headline[0]
    assert [cells(r)[0].strip() for r in headline[2:]] == ["ppo@100", "ppo@200", "ppo@300", "reference"]
    assert all(len(cells(r)) == width for r in headline)
    assert "0.62 [0.50, 0.75]" in headline[2]
    for name in ("score_kl_by_step.png", "gold_vs_kl.png", "training_curves.png"):
        assert f"]({name})" in md

    sample = table_after(md, "| Model | Response")
    assert len(sample) == 4 and all(len(cells(r)) == 4 for r in sample)
    assert "a \\| b<br>second line &lt;\\|endoftext\\|>" in sample[3]
    assert "````\nSay | and ```code```\n````" in md  # the prompt verbatim, fenced past its own backticks

    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: run ") for w in warnings)
    assert "broken" in warnings[0] and "line 2" in warnings[0] and "missing" in warnings[1]


def test_without_gold_or_steps_only_the_applicable_files_are_written(tmp_path, capsys):
    report = make_report(gold=False, steps=False)
    written = report_lib.write_report(tmp_path, report, [])
    assert {p.name for p in written} == {"report.json", "report.md"}
    md = (tmp_path / "report.md").read_text()
    assert "Gold" not in md and ".png" not in md and "## Samples" not in md
    assert all(len(cells(r)) == 8 for r in table_after(md, "| Policy"))
    assert capsys.readouterr().err == ""


def test_json_is_strict_and_plain(tmp_path):
    report = make_report()
    report["policies"][0]["kl"] = np.float32(0.5)
    report["policies"][0]["step"] = np.int64(100)
    report["reference"]["score_std"] = float("nan")
    report_lib.write_report(tmp_path, report, [])
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["policies"][0]["kl"] == 0.5 and loaded["policies"][0]["step"] == 100
    assert loaded["reference"]["score_std"] is None


def test_headline_lines():
    lines = report_lib.headline(make_report())
    assert lines[0] == ("ppo@100: win rate 0.62 [0.50, 0.75] vs reference by RM score, "
                        "gold win rate 0.50 [0.38, 0.62], KL 1.50 nats")
    assert len(lines) == 3
    assert "gold" not in report_lib.headline(make_report(gold=False))[0]


def test_import_does_not_load_matplotlib():
    code = "import sys, rlhf_jax.eval.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_run_of_the_step_plot_is_a_line_of_its_own(monkeypatch):
    """--all-steps over two runs: each run's checkpoints joined in step order, never one run's to the other's."""
    report = make_report()
    other = [dict(p, name=p["name"].replace("ppo@", "ppo_b@"), step=p["step"] + 50, kl=10 + p["kl"])
             for p in report["policies"]]
    report["policies"] = [*reversed(report["policies"]), *other]  # the newest first, as listed by some callers
    figures = []
    monkeypatch.setattr(report_lib, "_png", lambda fig: figures.append(fig) or b"")
    report_lib._score_kl_by_step_png(report)
    kl_ax = figures[0].axes[1]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in kl_ax.get_lines()}
    assert lines == {"ppo": ([100, 200, 300], [1.5, 3.0, 4.5]), "ppo_b": ([150, 250, 350], [11.5, 13.0, 14.5])}


def test_a_rerun_into_the_same_directory_leaves_no_plot_of_the_earlier_one(tmp_path):
    first = {p.name for p in report_lib.write_report(tmp_path, make_report(), [])}
    assert {"score_kl_by_step.png", "gold_vs_kl.png"} <= first
    second = report_lib.write_report(tmp_path, make_report(gold=False, steps=False), [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in second) == ["report.json",
                                                                                           "report.md"]


def test_the_verdict_says_when_the_kl_is_not_of_the_sampled_distributions():
    """Greedy or filtered sampling draws from other distributions than the ones whose KL is reported."""
    report = make_report()
    assert report_lib.verdict(report)[1].endswith("at a KL of 4.50 nats from the reference.")
    report["kl_of_sampled_distributions"] = False
    line = report_lib.verdict(report)[1]
    assert line.endswith("at a KL of 4.50 nats from the reference (of the unfiltered distributions: the responses "
                         "were drawn greedily or filtered)."), line
    assert line in report_lib.markdown_report(report, [])


def test_the_verdict_never_says_the_kl_is_negative():
    """The k1 estimate of a policy close to its reference can be below 0; printed as the KL it read as nonsense."""
    report = make_report(gold=False)
    report["policies"][-1].update(kl=-0.0082, kl_k3=0.0027)
    assert report_lib.verdict(report)[1] == ("It is at a KL near 0 nats from the reference (the sampled estimate is "
                                             "-0.01; k3, never negative: 0.003).")


def test_a_verdict_without_a_gold_scorer_gives_the_reward_models_rate_once():
    report = make_report(gold=False)
    first, second = report_lib.verdict(report)[:2]
    assert "% of the time by the reward model, no gold scorer given (95% CI " in first and "((" not in first
    assert second == "It is at a KL of 4.50 nats from the reference.", second
    with_gold = report_lib.verdict(make_report())
    assert with_gold[1].startswith("By the reward model it wins ") and "the gold score goes from" in with_gold[1]


def test_the_verdict_is_judged_by_the_gold_interval_at_its_bounds():
    """The last policy's gold win rate interval decides (the reward model's, agreeing or not, does not): an
    interval touching one half is no clear difference."""
    # a Wilson interval is not centred on its rate: a rate above (below) one half with an interval across it
    for rate, ci, outcome in ((0.5, [0.5, 0.5], "RLHF made no clear difference to the policy"),
                              (0.4375, [0.375, 0.5], "RLHF made no clear difference to the policy"),
                              (0.6, [0.45, 0.75], "RLHF made no clear difference to the policy"),
                              (0.4, [0.25, 0.55], "RLHF made no clear difference to the policy"),
                              (0.6, [0.5001, 0.7], "RLHF improved the policy"),
                              (0.4, [0.3, 0.4999], "RLHF made the policy worse")):
        report = make_report()
        report["policies"][-1].update(gold_win_rate=rate, gold_win_rate_ci=ci, win_rate=0.9, win_rate_ci=[0.8, 0.95])
        first = report_lib.verdict(report)[0]
        assert first.startswith(outcome + ":") and "by the gold reward" in first, (ci, first)
        assert f"{100 * rate:.0f}% of the time" in first


def test_training_curves_name_their_metric_on_the_y_axis(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report_lib, "_png", lambda fig: figures.append(fig) or b"")
    report_lib._training_curves_png(report_lib._read_runs(make_runs(tmp_path)))
    shown = [(ax.get_title(), ax.get_ylabel()) for ax in figures[0].axes if ax.get_visible()]
    assert shown == [("SFT loss", "loss"), ("PPO score", "score_mean"), ("PPO KL", "kl"), ("PPO entropy", "entropy")]


def test_two_checkpoints_of_a_run_make_a_step_plot_and_one_does_not(tmp_path):
    report = make_report()
    report["policies"] = report["policies"][:2]
    assert "score_kl_by_step.png" in {p.name for p in report_lib.write_report(tmp_path / "two", report, [])}
    report["policies"] = report["policies"][:1]
    assert "score_kl_by_step.png" not in {p.name for p in report_lib.write_report(tmp_path / "one", report, [])}


def test_one_frontier_of_gold_against_kl_is_drawn_in_order_of_kl(monkeypatch):
    report = make_report()
    for p, kl in zip(report["policies"], (3.0, -0.01, 2.0)):  # a k1 estimate below the reference's 0
        p["kl"] = kl
    figures = []
    monkeypatch.setattr(report_lib, "_png", lambda fig: figures.append(fig) or b"")
    report_lib._gold_vs_kl_png(report)
    (line,) = figures[0].axes[0].get_lines()
    assert list(line.get_xdata()) == [-0.01, 0.0, 2.0, 3.0]  # the reference's 0 among the policies, by KL

    # separate runs (dpo's and ppo's exports) are separate lines, each from the reference: no path joins them
    report["policies"][0]["name"], report["policies"][1]["name"] = "dpo/export", "ppo/export"
    figures.clear()
    report_lib._gold_vs_kl_png(report)
    lines = figures[0].axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0.0, 3.0], [-0.01, 0.0], [0.0, 2.0]]
