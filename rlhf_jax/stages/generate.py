"""The generate stage: samples from a model for a prompt file into a JSONL file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.errors import UserError
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.generation import Generator, read_prompts
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.tiny import bundled_prompts, resolve_model_path
from rlhf_jax.models.tokenizer import PAD_ID
from rlhf_jax.runtime import distributed, sharding
from rlhf_jax.runtime.fsio import write_json_atomically
from rlhf_jax.runtime.metrics import MetricsWriter
from rlhf_jax.training.run import refuse_another_stages_run


def run_generate(cfg: Config, run_dir: Path) -> dict:
    primary = distributed.is_primary()  # with several processes all sample, process 0 writes
    out_path = Path(cfg.generate.output or run_dir / "samples.jsonl")
    if out_path.is_dir():
        raise UserError(f"generate.output: {out_path} is a directory, expected a JSONL file path")
    existing = next(p for p in out_path.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"generate.output={out_path}: {existing} is a file, expected a directory")
    if out_path.exists() and not _own_output(run_dir, out_path):
        raise UserError(f"generate.output={cfg.generate.output}: already exists and is not this run_dir's earlier "
                        "output; choose another path, or delete the file to replace it")
    refuse_another_stages_run(run_dir, "generate")
    s = cfg.sampling
    mesh = sharding.mesh_from_config(cfg.mesh)
    sharding.check_batch_size(s.batch_size, mesh, "sampling.batch_size")  # before a model loads
    prompts = read_prompts(cfg.generate.prompt_file) if cfg.generate.prompt_file else bundled_prompts()
    gen = Generator(load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed), need_tokenizer=True,
                               key="model.path" if cfg.model.path else ""), mesh,
                    SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, pad_id=PAD_ID),
                    cfg.model.dtype, cfg.data.chat_template, where=f"model.path={cfg.model.path}")
    if primary:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    t0, n_tokens, n = time.perf_counter(), 0, 0
    try:
        with open(tmp if primary else os.devnull, "w") as f, \
                MetricsWriter(run_dir, "generate", resume_step=0) as metrics:
            for record in gen.generate(prompts, s.batch_size, s.max_prompt_tokens, cfg.seed):
                f.write(json.dumps(record) + "\n")
                n, n_tokens = n + 1, n_tokens + len(record["ids"])
                if n % s.batch_size == 0 or n == len(prompts):
                    metrics.write(n, {"new_tokens": n_tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0)})
    except BaseException:  # a failed or interrupted run leaves no half-written samples
        if primary:
            tmp.unlink(missing_ok=True)
        raise
    if primary:  # the config names the output it wrote: a failed run leaves the earlier run's pair as it was
        tmp.replace(out_path)
        write_json_atomically(run_dir / "config.json", config_to_dict(cfg))
    summary = {"stage": "generate", "prompts": n, "new_tokens": n_tokens, "output": str(out_path),
               "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(summary))
    return summary


def _own_output(run_dir: Path, out_path: Path) -> bool:
    """Whether `out_path` is what a generate run in `run_dir` wrote before (its samples.jsonl, or the
    generate.output its config.json names): the one existing file a rerun replaces."""
    if out_path == run_dir / "samples.jsonl":
        return True
    try:
        earlier = json.loads((run_dir / "config.json").read_text())["generate"]["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(earlier) and Path(earlier).resolve() == out_path.resolve()
