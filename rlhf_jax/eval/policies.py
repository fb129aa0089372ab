"""The policies an evaluation compares: finding them (export/best/HF directories, a training run's latest checkpoint
with the older ones to fall back on, a named step, or every saved step), checked to exist and to be policies before
anything is sampled, and restoring a checkpoint's policy params through `models.checkpoint`."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rlhf_jax.errors import UserError
from rlhf_jax.models import lora
from rlhf_jax.models.checkpoint import (CHAT_TEMPLATE, LoadedModel, UnrestorableCheckpoint, load_model, model_head,
                                       model_meta, restore_params)
from rlhf_jax.models.layer_stack import unstack_layers
from rlhf_jax.models.tiny import resolve_model_path

# Where each training stage keeps the policy's params inside its checkpointed state.
POLICY_PARAMS = {"sft": ("params",), "dpo": ("params",), "ppo": ("policy", "params"), "grpo": ("policy", "params"),
                 "rloo": ("policy", "params")}


SCALAR_NOT_POLICY = "a reward/value model (scalar head), expected a policy (language model)"


class PolicySource(NamedTuple):
    name: str
    path: Path
    step: int | None  # a training checkpoint's step; None for a model directory
    older: tuple[int, ...] = ()  # a run's latest step: the steps to fall back on, newest first
    optional: bool = False  # one of --all-steps: skipped when it cannot be restored


def policy_sources(paths: Sequence[str], step: int = 0, all_steps: bool = False) -> list[PolicySource]:
    """Every policy to evaluate, checked to exist (and be a policy) before anything is sampled."""
    sources: list[PolicySource] = []
    name_of = _short_names(paths)
    for text in paths:
        path = Path(text)
        if path.parent.name == "checkpoints" and path.name.isdigit():  # one step of a run, named directly
            run, named = path.parent.parent, int(path.name)
            _run_stage(run)
            _check_steps(run, [named], path)
            sources.append(PolicySource(f"{name_of(run)}@{named}", run, named))
        elif (path / "checkpoints").is_dir() and not (path / "model.json").exists():
            _run_stage(path)
            saved = sorted(_saved_steps(path), reverse=True)
            if all_steps:
                sources += [PolicySource(f"{name_of(path)}@{s}", path, s, optional=True) for s in reversed(saved)]
            elif step:
                _check_steps(path, [step], path)
                sources.append(PolicySource(f"{name_of(path)}@{step}", path, step))
            else:  # the latest step, with the older ones to fall back on
                sources.append(PolicySource(f"{name_of(path)}@{saved[0]}", path, saved[0], tuple(saved[1:])))
        else:
            if model_head(path) != "lm":
                raise UserError(f"{path}: {SCALAR_NOT_POLICY}")
            sources.append(PolicySource(name_of(path), path, None))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        twice = sorted(n for n in names if names.count(n) > 1)[0]
        raise UserError(f"eval.policies: {twice} is given twice")
    return sources


def _short_names(paths: Sequence[str]) -> Callable[[Path], str]:
    """Each policy's name: the last two parts of its path, with the run directory for an export/ or best/
    (runs/ppo/export -> ppo/export), more parts where two paths would share them (a/ppo/export, b/ppo/export)."""
    def directory(path) -> Path:
        path = Path(path)
        return path.parent.parent if path.parent.name == "checkpoints" and path.name.isdigit() else path

    resolved = {directory(p).resolve() for p in paths}
    names = {}
    for path in resolved:
        parts = path.parts
        n = 2
        while n < len(parts) and any(other != path and other.parts[-n:] == parts[-n:] for other in resolved):
            n += 1
        names[path] = "/".join(parts[-n:])
    return lambda path: names.get(Path(path).resolve(), str(path))


def _run_stage(run: Path) -> str:
    config = run / "config.json"
    try:
        stage = json.loads(config.read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run}: a run directory without a readable config.json (expected one written by a "
                        "training stage)") from None
    if stage not in POLICY_PARAMS:
        what = "a reward model" if stage == "rm" else f"stage {stage!r}"
        raise UserError(f"{run}: a training run of {what}, not a policy; eval.policies takes sft, dpo, ppo, grpo "
                        "or rloo runs or policy exports")
    return stage


def _saved_steps(run: Path) -> list[int]:
    """Complete checkpoint steps of a run; an interrupted save (Orbax's temporary directory) is skipped with a
    warning and never read."""
    directory = run / "checkpoints"
    for partial in sorted(p for p in directory.iterdir() if "tmp" in p.name):
        warnings.warn(f"{partial}: an unfinished (interrupted) checkpoint save; skipped", stacklevel=2)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise UserError(f"{directory}: no complete checkpoint to evaluate")
    return steps


def _check_steps(run: Path, steps: list[int], named: Path) -> None:
    saved = _saved_steps(run)
    missing = [s for s in steps if s not in saved]
    if missing:
        raise UserError(f"{named}: no complete checkpoint of step {missing[0]}; saved steps: {saved}")


def load_policy(source: PolicySource, base_models: dict) -> LoadedModel:
    """The policy's params (numpy) with its config and tokenizer. A run's base model (for its config and
    tokenizer) is loaded once per run; a checkpoint reads only the policy's params from the saved state."""
    if source.step is None:
        loaded = load_model(source.path, need_tokenizer=True)
        if loaded.head != "lm":
            raise UserError(f"{source.path}: {SCALAR_NOT_POLICY}")
        return loaded
    run = source.path
    config = json.loads((run / "config.json").read_text())
    stage = config["stage"]
    if run not in base_models:
        base_models[run] = load_model(_base_model_path(run, config), need_tokenizer=True)
    base = base_models[run]
    params = unstack_layers(restore_params(run / "checkpoints" / str(source.step) / "state", POLICY_PARAMS[stage]))
    lora_config = config.get("lora", {})
    if lora_config.get("rank"):  # the checkpoint holds what trained: merged into the run's base model
        spec = lora.LoraSpec(lora_config["rank"], lora_config["alpha"], tuple(lora_config["targets"]),
                             also_train=tuple(lora_config.get("also_train", ())))
        # the base as the run trained it (in its param_dtype), merged in float32 as export/ does
        param_dtype = jnp.dtype(config.get("model", {}).get("param_dtype", "float32"))
        base_params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), base.params)
        whole = jax.tree.map(lambda x: np.asarray(x, np.float32), lora.join(params, base_params))
        params = jax.device_get(lora.merged(whole, base.cfg, spec))
    return _as_trained(base, config)._replace(params=params, head="lm")


def policy_meta(source: PolicySource) -> LoadedModel:
    """The policy's config and tokenizer without its weights (params None): a model directory's own, or the base
    model's of a run (its checkpoints hold params alone)."""
    if source.step is None:
        return model_meta(source.path, need_tokenizer=True)
    config = json.loads((source.path / "config.json").read_text())
    return _as_trained(model_meta(_base_model_path(source.path, config), need_tokenizer=True), config)


def _as_trained(base: LoadedModel, config: dict) -> LoadedModel:
    """A run's base model, its metadata saying how the run trained it (prompts in the chat template or not)."""
    chat_template = config.get("data", {}).get("chat_template", False)
    return base._replace(extra={**base.extra, CHAT_TEMPLATE: bool(chat_template)})


def _base_model_path(run: Path, config: dict) -> Path:
    """The run's model.path. A relative one is relative to the directory the run was started in, which is the
    run's real path less its configured run_dir (`runs/demo/ppo` started in /work trains from
    /work/runs/demo/sft/export), so that a run is evaluated from any directory, also after being moved with it."""
    path = config.get("model", {}).get("path", "")
    if not path or Path(path).is_absolute():
        return resolve_model_path(path, run, config.get("seed", 0))
    # an absolute run_dir, one with `..` or a renamed run: relative to where we are
    started_in = _started_in(run, str(config.get("run_dir", ""))) or Path.cwd()
    if not (started_in / path).exists():
        raise UserError(f"{run / 'config.json'}: the run's base model, model.path={path!r}, is not in {started_in} "
                        f"(a relative model.path is read from the directory the run was started in)")
    return started_in / path


def _started_in(run: Path, run_dir: str) -> Path | None:
    parts = Path(run_dir).parts
    real = run.resolve().parts
    if not run_dir or Path(run_dir).is_absolute() or ".." in parts or real[len(real) - len(parts):] != parts:
        return None
    return Path(*real[:len(real) - len(parts)])


def restorable_policy(source: PolicySource, base_models: dict) -> tuple[PolicySource, LoadedModel] | None:
    """(the source, its policy). A checkpoint that cannot be restored (truncated, half-written) is passed over
    with a warning, as training does: a run's latest step falls back to the step before it, a step of
    --all-steps is skipped (None); a step named by --step or by its path stops the run in one line."""
    steps = (source.step, *source.older)
    for i, step in enumerate(steps):
        candidate = source._replace(name=f"{source.name.rsplit('@', 1)[0]}@{step}", step=step) if i else source
        try:
            return candidate, load_policy(candidate, base_models)
        except UnrestorableCheckpoint as e:
            problem = f"checkpoint step {step} in {source.path / 'checkpoints'} cannot be restored ({e})"
            if i + 1 < len(steps):  # tqdm.write: on a line of its own while the progress bar runs
                tqdm.write(f"warning: {problem}; falling back to step {steps[i + 1]}", file=sys.stderr)
            elif source.optional:
                tqdm.write(f"warning: {problem}; skipped", file=sys.stderr)
            else:
                raise UserError(problem) from None
    return None
