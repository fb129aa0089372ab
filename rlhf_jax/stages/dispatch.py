"""Stage dispatch for `python -m rlhf_jax.main`: each stage reads the validated Config and owns a run dir."""

from __future__ import annotations

from pathlib import Path

from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.errors import UserError, os_error_message
from rlhf_jax.runtime import compile_cache, distributed
from rlhf_jax.runtime.fsio import make_run_dir, remove_made, run_dir_lock
from rlhf_jax.stages.generate import run_generate
from rlhf_jax.stages.prepare import check_prepare, run_prepare
from rlhf_jax.training.resume import flatten


def run_train(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.stages.train import train

    return train(cfg, run_dir)


def run_ppo(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.stages.ppo import train_ppo

    return train_ppo(cfg, run_dir)


def run_group(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.stages.grpo import train_group

    return train_group(cfg, run_dir)


def run_eval(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.eval.evaluate import run_eval as evaluate

    return evaluate(cfg, run_dir)


def run_task(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.tasks import run_task as generate_task

    return generate_task(cfg, run_dir)


def run_label(cfg: Config, run_dir: Path) -> dict:
    from rlhf_jax.stages.label import run_label as label

    return label(cfg, run_dir)


def check(cfg: Config) -> None:
    """What can be known wrong about a stage's config without reading its data or models: a pipeline checks
    every step with it before the first one runs."""
    if cfg.stage in ("sft", "rm", "dpo"):
        from rlhf_jax.stages.train import check_config
        check_config(cfg)
    elif cfg.stage == "ppo":
        from rlhf_jax.stages.ppo import check_config
        check_config(cfg)
    elif cfg.stage in ("grpo", "rloo"):
        from rlhf_jax.stages.grpo import check_config
        check_config(cfg)
    elif cfg.stage == "eval":
        from rlhf_jax.eval.evaluate import check_config
        check_config(cfg)
    elif cfg.stage == "label":
        from rlhf_jax.stages.label import check_config
        check_config(cfg)
    elif cfg.stage == "prepare":
        check_prepare(cfg)


STAGES = {"generate": run_generate, "sft": run_train, "rm": run_train, "ppo": run_ppo, "dpo": run_train,
          "grpo": run_group, "rloo": run_group, "eval": run_eval,
          "task": run_task, "label": run_label, "prepare": run_prepare}


def run(cfg: Config) -> dict:
    """Run the configured stage in its run dir, holding the run dir's lock. A stage that stops on a user error
    before it has recorded any progress leaves no run dir behind if it created one."""
    distributed.initialize(cfg.distributed)
    compile_cache.use(cfg.runtime.compile_cache)  # before the first program: check_same's gather compiles one
    distributed.check_same(settings_of(cfg), "settings")
    run_dir = Path(cfg.run_dir)
    created = make_run_dir(run_dir)
    try:
        if distributed.is_multiprocess():
            check_shared(run_dir, "run_dir")
        with run_dir_lock(run_dir):
            if cfg.stage in HOST_ONLY:  # nothing to share between processes: process 0 writes, the others wait
                return distributed.on_primary(lambda: STAGES[cfg.stage](cfg, run_dir))
            return STAGES[cfg.stage](cfg, run_dir)
    except (OSError, UserError) as e:
        if created and not _has_progress(run_dir):
            remove_made(created)
        if isinstance(e, OSError):
            raise UserError(os_error_message(e)) from None
        raise


def settings_of(cfg: Config) -> dict:
    """A config as flat keys, what every process of a run must agree on (the process's own index aside)."""
    return {k: v for k, v in flatten(config_to_dict(cfg)).items() if k != "distributed.process_id"}


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
    """Checkpoints, exports, logged metrics or a labeling task (with what people answered): what a failed run
    must keep."""
    metrics = run_dir / "metrics.jsonl"
    return (any((run_dir / "checkpoints").glob("[0-9]*")) or (run_dir / "export").exists()
            or (metrics.exists() and metrics.stat().st_size > 0) or (run_dir / "label.db").exists())
