"""Bundled tasks and the `task` stage: a task's generated data goes through the same importers and TFDS
datasets as a user's JSONL, and its base model is a random tiny model whose tokenizer is trained on the task's
corpus; everything after that (pretraining, SFT, labeling, RM, PPO, evaluation) is the ordinary stages.

The stage writes into data.dir the datasets `corpus` (sft rows, for pretraining with train.loss_on_prompt),
`demos` (sft) and `prompts`, each with an `eval` split, and `<run_dir>/base_model` (a HF checkpoint dir).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from rlhf_jax.config import Config
from rlhf_jax.data.prepare import prepare
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.runtime.fsio import write_text_atomically
from rlhf_jax.tasks import arithmetic, sentiment

# A task module has corpus(n, seed), prompts(n, seed) and, when its SFT demonstrations are not more of its corpus,
# demonstrations(n, seed).
TASKS = {"sentiment": sentiment, "arithmetic": arithmetic}


def run_task(cfg: Config, run_dir: Path) -> dict:
    t, task = cfg.task, TASKS[cfg.task.name]
    demonstrations = getattr(task, "demonstrations", task.corpus)
    rows = {"corpus": ("jsonl_sft", task.corpus(t.corpus, cfg.seed)),
            "demos": ("jsonl_sft", demonstrations(t.demonstrations, cfg.seed + 1)),
            "prompts": ("jsonl_prompts", task.prompts(t.prompts, cfg.seed + 2))}
    datasets = {}
    tfds.disable_progress_bar()  # the summary below says what was written
    for name, (fmt, records) in rows.items():
        path = run_dir / f"{name}.jsonl"
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
        datasets[name] = prepare(fmt, [str(path)], cfg.data.dir, name, t.eval_fraction, overwrite=True)["examples"]
    texts = [r["prompt"] + r["response"] for r in rows["corpus"][1]]
    base = build_tiny_model(run_dir / "base_model", seed=cfg.seed, overwrite=True, corpus=texts)
    summary = {"stage": "task", "task": t.name, "datasets": datasets, "data_dir": cfg.data.dir,
               "base_model": str(base)}
    write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary
