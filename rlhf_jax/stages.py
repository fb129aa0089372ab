"""Stage dispatch for `python -m rlhf_jax.main`: each stage reads the validated Config and owns a run dir."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from rlhf_jax import distributed, sharding
from rlhf_jax.checkpoint import load_model
from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.errors import UserError, os_error_message, os_reason
from rlhf_jax.fsio import run_dir_lock, write_json_atomically
from rlhf_jax.generate import Generator, read_prompts
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.sampling import SamplingParams
from rlhf_jax.tiny import bundled_prompts, resolve_model_path
from rlhf_jax.tokenizer import PAD_ID


def run_generate(cfg: Config, run_dir: Path) -> dict:
    primary = distributed.is_primary()  # with several processes all sample, process 0 writes
    out_path = Path(cfg.generate.output or run_dir / "samples.jsonl")
    if out_path.is_dir():
        raise UserError(f"generate.output: {out_path} is a directory, expected a JSONL file path")
    if out_path.exists() and not _own_output(run_dir, out_path):
        raise UserError(f"generate.output={cfg.generate.output}: already exists and is not this run_dir's earlier "
                        "output; choose another path, or delete the file to replace it")
    if primary:
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    mesh = sharding.mesh_from_config(cfg.mesh)
    prompts = read_prompts(cfg.generate.prompt_file) if cfg.generate.prompt_file else bundled_prompts()
    s = cfg.sampling
    gen = Generator(load_model(resolve_model_path(cfg.model.path, run_dir, cfg.seed), need_tokenizer=True), mesh,
                    SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, pad_id=PAD_ID),
                    cfg.model.dtype, cfg.data.chat_template)
    if primary:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    t0, n_tokens, n = time.perf_counter(), 0, 0
    with open(tmp if primary else os.devnull, "w") as f, MetricsWriter(run_dir, "generate") as metrics:
        for record in gen.generate(prompts, s.batch_size, s.max_prompt_tokens, cfg.seed):
            f.write(json.dumps(record) + "\n")
            n, n_tokens = n + 1, n_tokens + len(record["ids"])
            if n % s.batch_size == 0 or n == len(prompts):
                metrics.write(n, {"new_tokens": n_tokens, "tokens_per_s": n_tokens / (time.perf_counter() - t0)})
    if primary:
        tmp.replace(out_path)
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


def run_train(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.trainers import train

    return train(cfg, run_dir)


def run_ppo(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.ppo_stage import train_ppo

    return train_ppo(cfg, run_dir)


def run_eval(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.evaluate import run_eval as evaluate

    return evaluate(cfg, run_dir)


def run_task(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.tasks import run_task as generate_task

    return generate_task(cfg, run_dir)


def run_label(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.label import run_label as label

    return label(cfg, run_dir)


def check_prepare(cfg: Config) -> None:
    from rlhf_jax.data.formats import FORMATS
    from rlhf_jax.data.prepare import check_name

    p = cfg.prepare
    for key in ("format", "inputs", "name"):
        if not getattr(p, key):
            raise UserError(f"stage 'prepare' needs prepare.{key}")
    if p.format not in FORMATS:
        raise UserError(f"prepare.format={p.format!r}: unknown; expected one of {sorted(FORMATS)}")
    check_name(p.name)


def check(cfg: Config) -> None:
    """What can be known wrong about a stage's config without reading its data or models: a pipeline checks
    every step with it before the first one runs."""
    if cfg.stage in ("sft", "rm"):
        from rlhf_jax.trainers import check_config
        check_config(cfg)
    elif cfg.stage == "ppo":
        from rlhf_jax.ppo_stage import check_config
        check_config(cfg)
    elif cfg.stage == "eval":
        from rlhf_jax.evaluate import check_config
        check_config(cfg)
    elif cfg.stage == "label":
        from rlhf_jax.label import check_config
        check_config(cfg)
    elif cfg.stage == "prepare":
        check_prepare(cfg)


def run_prepare(cfg: Config, run_dir: Path) -> dict:
    """Imports prepare.inputs as dataset prepare.name in data.dir (replacing it: a pipeline reruns an
    unfinished step whole)."""
    from rlhf_jax.data.prepare import prepare, quiet_tfds

    check_prepare(cfg)
    quiet_tfds()  # the summary below says what was written
    p = cfg.prepare
    summary = {"stage": "prepare", **prepare(p.format, list(p.inputs), cfg.data.dir, p.name, p.eval_fraction,
                                              p.skip_invalid, overwrite=True)}
    write_json_atomically(run_dir / "summary.json", summary)
    print(json.dumps(summary))
    return summary


STAGES = {"generate": run_generate, "sft": run_train, "rm": run_train, "ppo": run_ppo, "eval": run_eval,
          "task": run_task, "label": run_label, "prepare": run_prepare}


def run(cfg: Config) -> dict:
    """Run the configured stage in its run dir, holding the run dir's lock. A stage that stops on a user error
    before it has recorded any progress leaves no run dir behind if it created one."""
    distributed.initialize(cfg.distributed)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir={cfg.run_dir}: is a file, expected a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run_dir={cfg.run_dir}: cannot create ({os_reason(e)})") from None
    try:
        if distributed.is_multiprocess():
            check_shared(run_dir, "run_dir")
        with run_dir_lock(run_dir):
            if cfg.stage in HOST_ONLY:  # nothing to share between processes: process 0 writes, the others wait
                return distributed.on_primary(lambda: STAGES[cfg.stage](cfg, run_dir))
            return STAGES[cfg.stage](cfg, run_dir)
    except OSError as e:
        raise UserError(os_error_message(e)) from None
    except UserError:
        if created and not _has_progress(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


HOST_ONLY = ("task", "prepare")  # stages that write files and run no sharded program


def check_shared(directory: Path, key: str) -> None:
    """With several processes: every one must see the same `directory` (checkpoints are written by all of them
    into one place, and they read process 0's files), so a directory local to each host is refused in one line."""
    name = f".shared-check-{distributed.shared_token()}"
    if distributed.is_primary():
        (directory / name).write_text("")
    distributed.barrier(f"wrote {name}")
    seen = distributed.all_gather_json((directory / name).exists())
    distributed.barrier(f"checked {name}")
    if distributed.is_primary():
        (directory / name).unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(seen) if not ok]
    if blind:
        raise UserError(f"{key}={directory}: not shared between the processes (process {blind[0]} cannot see "
                        "process 0's files); put it on storage every host mounts (NFS, Filestore, a gcsfuse bucket)")


def _has_progress(run_dir: Path) -> bool:
    """Checkpoints, exports or logged metrics: what a failed run must keep."""
    metrics = run_dir / "metrics.jsonl"
    return (any((run_dir / "checkpoints").glob("[0-9]*")) or (run_dir / "export").exists()
            or (metrics.exists() and metrics.stat().st_size > 0))
