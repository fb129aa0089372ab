"""Whether a run may resume from its checkpoint with the config it is given now.

A change that would make the resumed run a different run (another model, seed, dataset, batch, or anything
that changes the shapes of the saved state) is refused in one line naming the keys; a change that only steers
the rest of the run (more steps, another learning rate, eval cadence) is allowed and listed in a warning. The
models a run reads are judged by their files' fingerprints where the checkpoint recorded them: another model
at the same path is refused, the same model at another path is allowed.
Pure functions over plain dicts, so each rule is tested directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf_jax.config import STAGE_SECTIONS
from rlhf_jax.models.layer_stack import STACKED

# Keys whose change makes the saved state, the data order or the step keys meaningless for the new run.
REFUSED = ("stage", "seed", "model.path", "model.param_dtype", "data.dir", "data.name", "data.train_split",
           "data.pack", "data.max_responses", "train.batch_size", "ppo.reward_model", "ppo.value_model",
           "grpo.reward_model", "grpo.reward_function", "rloo.reward_model", "rloo.reward_function",
           # the prompts' form: the steps before and after would train on two encodings of every prompt (the export
           # records one)
           "data.chat_template",
           # the KL's (DPO's) reference: another one is another objective
           "ppo.reference", "dpo.reference", "grpo.reference", "rloo.reference",
           # the adapters' scale: the saved adapters would mean another model (and every checkpoint read with it);
           # what LoRA trains changes the saved state's shapes, refused by them too but then named by parameter
           "lora.alpha", "lora.rank", "lora.targets", "lora.also_train",
           # PPO-ptx's data: the saved position counts batches of this dataset of this size
           "ppo.ptx_dataset", "ppo.ptx_batch_size")
# Keys whose switch between 0 and another value changes what the checkpoint holds: clipping's optimizer state,
# PPO-ptx's data position, the EMA of the policy.
ON_OFF = ("optim.grad_clip", "ppo.ptx_coef", "ppo.ema_decay")
# model directories, compared where they lead
MODELS = ("model.path", "ppo.reward_model", "ppo.value_model", "grpo.reward_model", "rloo.reward_model",
          "ppo.reference", "dpo.reference", "grpo.reference", "rloo.reference")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested config dict."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if key in (*MODELS, "data.dir") and old and new:  # the same place, however it is spelled
        return os.path.realpath(old) == os.path.realpath(new)
    return old == new


def _shown(value: Any) -> str:
    """A config value as the user writes it: YAML's true, false and null; other values quoted as Python does."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _moved_with_run(old: Any, new: Any, old_run: Any, new_run: Any) -> bool:
    """Whether a data or model directory moved with the run directory (a pipeline's {run_dir}/data or its sft
    export, the pipeline moved or copied): the same place relative to each."""
    if not (old and new and old_run and new_run):
        return False
    relative = [os.path.relpath(os.path.abspath(d), os.path.abspath(r)) for d, r in ((old, old_run), (new, new_run))]
    return relative[0] == relative[1]


def _unread(key: str, stage: Any) -> bool:
    """Whether `key` is in a section the stage never reads (ppo.* for an sft run): no change counts there."""
    section = key.partition(".")[0] if "." in key else None
    return section is not None and stage in STAGE_SECTIONS and section not in STAGE_SECTIONS[stage]


def _refused(key: str, old: Any, new: Any, stage: Any) -> bool:
    if key in ON_OFF:
        return (not old) != (not new)
    return key in REFUSED


def config_changes(old: dict, new: dict, same_models=frozenset(), defaults: dict | None = None
                   ) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between a checkpoint's config and the new one, as 'key=old (now new)'; a
    model key in `same_models` names the same files (`model_changes`), so its new path is allowed. A key the
    checkpoint's config lacks (added to the schema since) at its value in `defaults` (a config's defaults) is no
    change."""
    before, after, defaults = flatten(old), flatten(new), flatten(defaults or {})
    refused, allowed = [], []
    for key in sorted(set(before) | set(after)):
        old_value, new_value = before.get(key), after.get(key)
        if key == "run_dir":  # the run itself, wherever it was moved or copied to
            continue
        if _unread(key, after.get("stage")) or (key not in before and key in defaults and new_value == defaults[key]):
            continue
        if key.startswith("lora.") and key != "lora.rank" and not (before.get("lora.rank") and after.get("lora.rank")):
            continue  # LoRA's other settings are read only where both runs train adapters
        # moved with the run: the same dataset (its fingerprint is compared as data.name's), the same model files
        if (key == "data.dir" or key in same_models) and _moved_with_run(old_value, new_value, before.get("run_dir"),
                                                                         after.get("run_dir")):
            continue
        if not _same(key, old_value, new_value):
            change = f"{key}={_shown(old_value)} (now {_shown(new_value)})"
            refuse = _refused(key, old_value, new_value, after.get("stage")) and key not in same_models
            (refused if refuse else allowed).append(change)
    return refused, allowed


def model_changes(old: dict, new: dict) -> tuple[list[str], set[str]]:
    """(models replaced at their path since the run started, as 'key=path'; keys of the models with the same
    files, wherever they are now) between two {key: {"path", "fingerprint"}} records. Another model at another
    path is left to `config_changes`, and so is a model one record lacks (a checkpoint from before
    fingerprints)."""
    changed, same = [], set()
    for key in sorted(set(old) & set(new)):
        if old[key].get("fingerprint") == new[key]["fingerprint"]:
            same.add(key)
        elif os.path.realpath(old[key]["path"]) == os.path.realpath(new[key]["path"]):
            changed.append(f"{key}={new[key]['path']}")
    return changed, same


def shape_changes(old: tuple[dict, list], new: tuple[dict, list], limit: int = 3) -> list[str]:
    """Differences between two `checkpoint.state_shapes` results: parameters by path, then the optimizer."""
    old_params, old_other = old
    new_params, new_other = new
    scanned = lambda params: any(STACKED in path.split("/")[:2] for path in params)  # `layers/...`, `policy/layers/...`
    if scanned(old_params) != scanned(new_params):  # the same weights in the other layout: say which key
        return [f"the checkpoint's layers are {'scanned' if scanned(old_params) else 'one subtree per layer'} "
                f"(set model.scan_layers={str(scanned(old_params)).lower()} to resume it)"]
    diffs = [f"parameter {path} {old_params.get(path)} (now {new_params.get(path)})"
             for path in sorted(set(old_params) | set(new_params)) if old_params.get(path) != new_params.get(path)]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"and {len(diffs) - limit} more parameters"]
    if not diffs and old_other != new_other:
        diffs.append(f"optimizer state ({len(old_other)} arrays, now {len(new_other)})")
    return diffs
