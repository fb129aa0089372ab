"""Run configuration: typed, frozen dataclasses loaded from YAML plus `a.b=value` overrides.

Every user mistake raises a one-line `ConfigError` naming the dotted key, so a bad
launch fails before any model or device work starts.
"""

import collections.abc
import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

import yaml

from rlhf_jax.errors import UserError

__all__ = [
    "ConfigError",
    "Config",
    "ModelSection",
    "MeshSection",
    "SamplingSection",
    "GenerateSection",
    "OptimSection",
    "PPOSection",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_help",
]


class ConfigError(UserError):
    """A mistake in the user's configuration. The message is always a single line."""


class _FieldError(ConfigError):
    """A problem with one field, keyed relative to the dataclass that found it.

    The enclosing section re-raises it with its own prefix, so the final message
    carries the full dotted key even though each dataclass only knows its own fields.
    """

    def __init__(self, key: str, detail: str):
        super().__init__(f"'{key}' {detail}")
        self.key = key
        self.detail = detail


# ---------------------------------------------------------------------------
# Generic conversion driven by type hints
# ---------------------------------------------------------------------------

_SCALAR_NAMES = {int: "an int", float: "a float", str: "a string", bool: "a bool (true/false)"}


def _show(value: Any) -> str:
    """Short one-line rendering of a user value for error messages."""
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value)  # repr escapes newlines, keeping messages on one line
    return text if len(text) <= 80 else text[:77] + "..."


def _optional_inner(tp: Any) -> Any | None:
    """For `X | None` return X; for anything else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported config annotation {tp!r}")
        return inner[0]
    return None


def _type_label(tp: Any) -> str:
    """Compact type name for help text and messages."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_label(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(c) for c in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_label(typing.get_args(tp)[0])}"
    if is_dataclass(tp):
        return "section"
    return tp.__name__


def _expected(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_label(typing.get_args(tp)[0])}"
    return _SCALAR_NAMES.get(tp, _type_label(tp))


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):  # bool is an int subclass; true/false is never a number here
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # yaml.safe_load (YAML 1.1) reads `1e-5` as a string, so accept numeric strings.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, normalising lists to tuples and numbers to float."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(value, inner, key)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        detail = f"must be one of {list(args)!r}, got {_show(value)}"
        close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
        if close:
            detail += f" (did you mean {close[0]!r}?)"
        raise _FieldError(key, detail)

    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported config annotation {tp!r}")
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_convert(v, args[0], key) for v in value)
            except _FieldError:
                pass  # report the whole list below; the element alone lacks context
        raise _FieldError(key, f"expects {_expected(tp)}, got {_show(value)}")

    if is_dataclass(tp):
        if isinstance(value, tp):
            return value  # already validated when it was built
        if value is None:
            value = {}  # an empty YAML section (`optim:`) means all defaults
        if not isinstance(value, Mapping):
            raise _FieldError(key, f"expects a mapping, got {_show(value)}")
        return _build(tp, value, f"{key}.")

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise _FieldError(key, f"expects a finite float, got {_show(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r}")
    raise _FieldError(key, f"expects {_expected(tp)}, got {_show(value)}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(obj: Any) -> None:
    """Convert every field of a (frozen) dataclass in place; called first in __post_init__."""
    for name, tp in _field_types(type(obj)).items():
        object.__setattr__(obj, name, _convert(getattr(obj, name), tp, name))


def _check(obj: Any, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise _FieldError(name, f"{requirement}, got {_show(getattr(obj, name))}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key under `cls`: section names and leaf fields."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, tp in _field_types(cls).items():
        if is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _unknown_key_message(key: str, candidates: Sequence[str]) -> str:
    message = f"unknown key {key!r}"
    close = difflib.get_close_matches(key, candidates, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def _unknown_keys(data: Mapping, cls: type, prefix: str):
    """Yield dotted paths in `data` that `cls` has no field for."""
    known = _field_types(cls)
    for k, v in data.items():
        path = f"{prefix}{k}"
        if k not in known:
            # Report the deepest path so `sampleing: {temperature: ..}` suggests the full key.
            while isinstance(v, Mapping) and v:
                sub, v = next(iter(v.items()))
                path = f"{path}.{sub}"
            yield path
        elif is_dataclass(known[k]) and isinstance(v, Mapping):
            yield from _unknown_keys(v, known[k], f"{path}.")


def _build(cls: type, data: Mapping, prefix: str) -> Any:
    unknown = next(_unknown_keys(data, cls, prefix), None)
    if unknown is not None:
        candidates = [prefix + k for k in _all_keys(cls)]
        raise ConfigError(_unknown_key_message(unknown, candidates))
    try:
        return cls(**data)
    except _FieldError as e:
        raise ConfigError(f"'{prefix}{e.key}' {e.detail}") from None


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

Dtype = Literal["float32", "bfloat16"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass(frozen=True)
class ModelSection:
    path: str = _opt("", 'HF or rlhf_jax checkpoint dir; "" builds the tiny built-in model')
    dtype: Dtype = _opt("float32", "compute dtype (params stay in param_dtype)")
    param_dtype: Dtype = _opt("float32", "dtype parameters are stored in")
    remat: Literal["none", "block"] = _opt("none", "'block' recomputes each block's activations in the backward pass")

    def __post_init__(self):
        _coerce(self)


@dataclass(frozen=True)
class MeshSection:
    shape: tuple[int, ...] = _opt((-1, 1, 1), "devices per mesh axis; one -1 takes all remaining devices")
    axes: tuple[str, ...] = _opt(("data", "fsdp", "tensor"), "mesh axis names, one per shape entry")
    preset: str = _opt("", "a named topology instead of shape (v5e-16, v5p-64, 8xH100, 2x8xH100; see "
                            "rlhf_jax/runtime/sharding.py MESH_PRESETS); its device count is checked at start")

    def __post_init__(self):
        _coerce(self)
        from rlhf_jax.runtime.sharding import MESH_PRESETS  # the table lives with the mesh code

        _check(self, "preset", not self.preset or self.preset in MESH_PRESETS,
               f"unknown; expected one of {sorted(MESH_PRESETS)}")
        _check(self, "preset", not self.preset or (self.shape, self.axes) == ((-1, 1, 1), ("data", "fsdp", "tensor")),
               "set mesh.preset or mesh.shape/mesh.axes, not both")
        _check(self, "shape", len(self.shape) > 0, "must not be empty")
        _check(self, "shape", all(n == -1 or n >= 1 for n in self.shape), "entries must be >= 1 or -1")
        _check(self, "shape", self.shape.count(-1) <= 1, "may contain at most one -1")
        _check(self, "axes", len(self.axes) == len(self.shape),
               f"must have one name per shape entry ({len(self.shape)})")
        _check(self, "axes", all(self.axes), "names must be non-empty")
        _check(self, "axes", len(set(self.axes)) == len(self.axes), "names must be unique")


@dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str = _opt("", "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS; SLURM and TPU VMs "
                                        "are detected); empty with one process")
    num_processes: int = _opt(0, "processes in the run (else $JAX_NUM_PROCESSES); 0: from the environment")
    process_id: int = _opt(-1, "this process's index (else $JAX_PROCESS_ID); -1: from the environment")

    def __post_init__(self):
        _coerce(self)
        _check(self, "num_processes", self.num_processes >= 0, "must be >= 0")
        _check(self, "process_id", self.process_id >= -1, "must be >= -1")


@dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = _opt(64, "tokens to generate per prompt")
    temperature: float = _opt(1.0, "softmax temperature; 0 means greedy")
    top_k: int = _opt(0, "keep only the k most likely tokens; 0 = off")
    top_p: float = _opt(1.0, "nucleus sampling probability mass; 1 = off")
    batch_size: int = _opt(8, "prompts generated together")
    max_prompt_tokens: int = _opt(128, "prompts are truncated to this many tokens")

    def __post_init__(self):
        _coerce(self)
        _check(self, "max_new_tokens", self.max_new_tokens > 0, "must be > 0")
        _check(self, "temperature", self.temperature >= 0, "must be >= 0")
        _check(self, "top_k", self.top_k >= 0, "must be >= 0")
        _check(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        _check(self, "batch_size", self.batch_size > 0, "must be > 0")
        _check(self, "max_prompt_tokens", self.max_prompt_tokens > 0, "must be > 0")


@dataclass(frozen=True)
class GenerateSection:
    prompt_file: str = _opt("", 'text file with one prompt per line; "" = bundled demo prompts')
    output: str = _opt("", 'JSONL output path; "" = <run_dir>/samples.jsonl')

    def __post_init__(self):
        _coerce(self)


@dataclass(frozen=True)
class DataSection:
    dir: str = _opt("data", "directory of prepared datasets (python -m rlhf_jax.data --data-dir)")
    name: str = _opt("", "prepared dataset name (python -m rlhf_jax.data --name)")
    train_split: str = _opt("train", "split trained on")
    eval_split: str = _opt("eval", "held-out split")
    max_prompt_tokens: int = _opt(256, "prompts are truncated from the left to this many tokens")
    max_response_tokens: int = _opt(256, "responses (EOS included) are truncated from the right to this many")
    max_responses: int = _opt(0, "rankings: response slots per prompt; 0 = the dataset's largest K")
    chat_template: bool = _opt(False, "wrap prompts in the tokenizer's chat template")
    pack: bool = _opt(False, "sft: pack several examples into each sequence")

    def __post_init__(self):
        _coerce(self)
        _check(self, "max_prompt_tokens", self.max_prompt_tokens > 0, "must be > 0")
        _check(self, "max_response_tokens", self.max_response_tokens > 0, "must be > 0")
        _check(self, "max_responses", self.max_responses == 0 or self.max_responses >= 2, "must be 0 or >= 2")


@dataclass(frozen=True)
class TrainSection:
    steps: int = _opt(0, "optimizer steps (set this or train.epochs)")
    epochs: float = _opt(0.0, "passes over the training split instead of train.steps (InstructGPT: sft 16, rm 1)")
    batch_size: int = _opt(16, "global batch: sequences (sft) or prompts with all their responses (rm)")
    eval_every: int = _opt(50, "steps between held-out evaluations; 0 = only at the end")
    eval_batches: int = _opt(0, "batches per evaluation; 0 = the whole eval split")
    eval_batch_size: int = _opt(0, "rows per evaluation forward; 0 = the training micro-batch "
                                   "(batch_size / optim.grad_accum_steps)")
    save_every: int = _opt(50, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _opt(2, "most recent checkpoints kept (the best model is exported separately)")
    log_every: int = _opt(10, "steps between metric fetches and log lines")
    loss_on_prompt: bool = _opt(False, "sft: train on prompt tokens too")

    def __post_init__(self):
        _coerce(self)
        for name in ("batch_size", "log_every", "keep_checkpoints"):
            _check(self, name, getattr(self, name) > 0, "must be > 0")
        for name in ("steps", "epochs", "eval_every", "eval_batches", "eval_batch_size", "save_every"):
            _check(self, name, getattr(self, name) >= 0, "must be >= 0")
        _check(self, "epochs", not (self.steps and self.epochs),
               f"and train.steps={self.steps} are both set; set one of them")


@dataclass(frozen=True)
class RMSection:
    normalize: Literal["none", "bias", "bias_gain"] = _opt(
        "bias", "after training, shift (and scale) rewards so reference responses score mean 0 (and std 1)")
    reference_dataset: str = _opt(
        "", "prepared sft dataset whose responses are the reference; "
            "\"\" = the best responses (never dispreferred) of data.eval_split")
    reference_examples: int = _opt(512, "reference responses scored for the normalisation")

    def __post_init__(self):
        _coerce(self)
        _check(self, "reference_examples", self.reference_examples > 0, "must be > 0")


@dataclass(frozen=True)
class PPOSection:
    reward_model: str = _opt("", "reward model export (scalar head; its reward_norm is applied)")
    value_model: str = _opt("", 'value model init: "" = the reward model, or another scalar-head export')
    value_lr: float = _opt(0.0, "value model learning rate; 0 = optim.lr")
    ema_decay: float = _opt(0.0, "EMA of the policy weights per iteration (InstructGPT 0.992), exported as "
                                 "export_ema/; 0 = off")
    kl_coef: float = _opt(0.02, "beta of the per-token KL penalty (InstructGPT 0.02); the initial beta when adaptive")
    kl_target: float = _opt(0.0, "adaptive KL controller target (nats per sequence); 0 = fixed kl_coef")
    kl_horizon: float = _opt(10000.0, "adaptive KL controller horizon in episodes")
    kl_estimator: Literal["k1", "k3"] = _opt("k1", "per-token KL estimator: k1 = logp - logp_ref, k3 = exp(d) - d - 1")
    no_eos_penalty: float | None = _opt(None, "score of a response that never emitted EOS, in the reward model's "
                                              "normalised units (after its reward_norm gain and bias; with "
                                              "rm.normalize bias_gain, reference responses score mean 0, std 1); "
                                              "null = keep its score")
    gamma: float = _opt(1.0, "GAE discount")
    lam: float = _opt(0.95, "GAE lambda")
    clip_ratio: float = _opt(0.2, "policy ratio clip epsilon")
    clip_value: float = _opt(0.2, "value prediction clip around the rollout's values")
    vf_coef: float = _opt(0.1, "value loss coefficient")
    entropy_coef: float = _opt(0.0, "entropy bonus coefficient (none by default)")
    whiten_rewards: bool = _opt(False, "scale rewards to unit variance over real tokens (mean kept)")
    epochs: int = _opt(1, "passes over each rollout batch (InstructGPT 1)")
    minibatches: int = _opt(1, "minibatches per epoch; each one optimizer step of policy and value")
    ptx_coef: float = _opt(0.0, "PPO-ptx: weight of the per-token mean pretraining LM loss; 0 = off (InstructGPT's "
                                "27.8 was for its own loss scaling: tune it, see the README)")
    ptx_dataset: str = _opt("", "PPO-ptx: prepared sft dataset for the LM loss (on every real token)")
    ptx_batch_size: int = _opt(0, "PPO-ptx: sequences of ptx_dataset per iteration, split over the minibatches; "
                                  "0 = train.batch_size")
    samples_every: int = _opt(10, "iterations between writing a few prompts, responses, scores and KL to "
                                  "samples.jsonl; 0 = never")

    def __post_init__(self):
        _coerce(self)
        for name in ("value_lr", "kl_coef", "kl_target", "clip_value", "vf_coef", "entropy_coef", "ptx_coef"):
            _check(self, name, getattr(self, name) >= 0, "must be >= 0")
        _check(self, "clip_ratio", self.clip_ratio > 0, "must be > 0 (0 clips every ratio to 1)")
        _check(self, "kl_horizon", self.kl_horizon > 0, "must be > 0")
        _check(self, "ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        _check(self, "gamma", 0 <= self.gamma <= 1, "must be in [0, 1]")
        _check(self, "lam", 0 <= self.lam <= 1, "must be in [0, 1]")
        _check(self, "epochs", self.epochs >= 1, "must be >= 1")
        _check(self, "ptx_batch_size", self.ptx_batch_size >= 0, "must be >= 0")
        _check(self, "samples_every", self.samples_every >= 0, "must be >= 0")
        _check(self, "minibatches", self.minibatches >= 1, "must be >= 1")


@dataclass(frozen=True)
class PrepareSection:
    format: str = _opt("", "input format (python -m rlhf_jax.data --help lists them)")
    inputs: tuple[str, ...] = _opt((), "input files or http(s) URLs")
    name: str = _opt("", "dataset name written to data.dir")
    eval_fraction: float = _opt(0.0, "share of prompts held out as split 'eval'")
    skip_invalid: bool = _opt(False, "skip bad rows (counted by reason) instead of stopping")

    def __post_init__(self):
        _coerce(self)
        _check(self, "eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class TaskSection:
    name: Literal["sentiment"] = _opt("sentiment", "the bundled task to generate (rlhf_jax/tasks/)")
    corpus: int = _opt(4000, "pretraining reviews (dataset 'corpus')")
    demonstrations: int = _opt(2000, "SFT demonstrations (dataset 'demos')")
    prompts: int = _opt(2000, "prompts for PPO and evaluation (dataset 'prompts')")
    eval_fraction: float = _opt(0.1, "share of each dataset held out (split 'eval')")

    def __post_init__(self):
        _coerce(self)
        for name in ("corpus", "demonstrations", "prompts"):
            _check(self, name, getattr(self, name) >= 1, "must be >= 1")
        _check(self, "eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class LabelSection:
    labeler: str = _opt("", "MODULE:FUNCTION ranking responses: f(prompts, responses_per_prompt, seed) -> ranks "
                            "(0 = best); a sibling labeler_ceiling(prompts, responses) is recorded when present")
    responses: int = _opt(4, "responses sampled per prompt and ranked together (InstructGPT K = 4..9)")
    prompts: int = _opt(0, "prompts of data.name's train split to label (the rankings' train split); 0 = all")
    eval_prompts: int = _opt(0, "prompts of data.name's eval split to label (the rankings' held-out split); 0 = all")
    dataset: str = _opt("rankings", "name of the prepared rankings dataset written to data.dir")

    def __post_init__(self):
        _coerce(self)
        _check(self, "responses", self.responses >= 2, "must be >= 2")
        _check(self, "prompts", self.prompts >= 0, "must be >= 0")
        _check(self, "eval_prompts", self.eval_prompts >= 0, "must be >= 0")


@dataclass(frozen=True)
class EvalSection:
    policies: tuple[str, ...] = _opt((), "policies to evaluate: export/best/HF dirs, or training run dirs (their "
                                         "latest checkpoint, eval.step or every step with eval.all_steps)")
    reference: str = _opt("", "the baseline policy every one is compared with (e.g. the sft export)")
    reward_model: str = _opt("", "reward model export scoring the responses (its reward_norm applied)")
    prompts: str = _opt("", "a prompt file (.txt, .jsonl) or a prepared prompts dataset dir, DIR[:SPLIT] "
                            "(default split: eval)")
    rankings: str = _opt("", "optional prepared rankings dataset DIR[:SPLIT] (default eval) for RM accuracy")
    gold: str = _opt("", "optional MODULE:FUNCTION scoring f(prompts, responses) -> scores (a programmatic "
                         "ground truth)")
    step: int = _opt(0, "checkpoint step of the run dirs in eval.policies; 0 = the latest")
    all_steps: bool = _opt(False, "evaluate every saved step of the run dirs in eval.policies")
    limit: int = _opt(0, "evaluate on the first N prompts; 0 = all")
    samples: int = _opt(4, "prompts shown with both responses in report.md")
    runs: tuple[str, ...] = _opt((), "run dirs whose metrics.jsonl training curves are plotted")
    out: str = _opt("", 'report directory; "" = run_dir')

    def __post_init__(self):
        _coerce(self)
        _check(self, "step", self.step >= 0, "must be >= 0")
        _check(self, "limit", self.limit >= 0, "must be >= 0")
        _check(self, "samples", self.samples >= 0, "must be >= 0")
        _check(self, "all_steps", not (self.all_steps and self.step), "cannot be combined with eval.step")


@dataclass(frozen=True)
class OptimSection:
    lr: float = _opt(1e-5, "peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = _opt("cosine", "learning-rate decay after warmup")
    warmup_steps: int = _opt(0, "steps of linear warmup from 0 to lr")
    weight_decay: float = _opt(0.0, "decoupled (AdamW) weight decay")
    b1: float = _opt(0.9, "Adam first-moment decay")
    b2: float = _opt(0.95, "Adam second-moment decay")
    eps: float = _opt(1e-8, "Adam denominator epsilon")
    grad_clip: float = _opt(1.0, "clip gradients to this global norm; 0 = off")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step")

    def __post_init__(self):
        _coerce(self)
        _check(self, "lr", self.lr >= 0, "must be >= 0")
        _check(self, "warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        _check(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check(self, "b1", 0 <= self.b1 < 1, "must be in [0, 1)")
        _check(self, "b2", 0 <= self.b2 < 1, "must be in [0, 1)")
        _check(self, "eps", self.eps > 0, "must be > 0")
        _check(self, "grad_clip", self.grad_clip >= 0, "must be >= 0")
        _check(self, "grad_accum_steps", self.grad_accum_steps >= 1, "must be >= 1")


@dataclass(frozen=True)
class Config:
    stage: Literal["generate", "sft", "rm", "ppo", "eval", "task", "label", "prepare"] = _opt(
        "generate", "stage to run: generate (sample), sft (fine-tune on demonstrations), rm (ranking reward model), "
                    "ppo (optimise the policy against the reward model), eval (win rate, score and KL report), "
                    "task (generate a bundled task's data and base model), label (sample K responses per prompt "
                    "and rank them with a programmatic labeler), prepare (import a dataset into data.dir, as "
                    "python -m rlhf_jax.data does); a YAML with a `pipeline:` mapping chains stages")
    run_dir: str = _opt("runs/default", "directory for checkpoints, logs and outputs")
    seed: int = _opt(0, "random seed for init, sampling and data order")
    model: ModelSection = _section(ModelSection, "which model to load and how to run it")
    mesh: MeshSection = _section(MeshSection, "device mesh for sharding")
    distributed: DistributedSection = _section(DistributedSection, "joining several processes (multi-host runs)")
    sampling: SamplingSection = _section(SamplingSection, "text generation settings")
    generate: GenerateSection = _section(GenerateSection, "inputs and outputs of the generate stage")
    data: DataSection = _section(DataSection, "prepared dataset and how it is tokenized")
    train: TrainSection = _section(TrainSection, "training loop of the sft and rm stages")
    rm: RMSection = _section(RMSection, "reward model specifics")
    ppo: PPOSection = _section(PPOSection, "PPO specifics (stage 3)")
    optim: OptimSection = _section(OptimSection, "optimizer and learning-rate schedule")
    eval: EvalSection = _section(EvalSection, "evaluation of policies against a reference (stage eval)")
    task: TaskSection = _section(TaskSection, "the bundled task generated by stage task")
    label: LabelSection = _section(LabelSection, "programmatic labeling of sampled responses (stage label)")
    prepare: PrepareSection = _section(PrepareSection, "a dataset to import into data.dir (stage prepare)")

    def __post_init__(self):
        _coerce(self)


# ---------------------------------------------------------------------------
# Loading, overrides, serialisation, help
# ---------------------------------------------------------------------------


def config_from_dict(d: Mapping) -> Config:
    """Build a validated Config from nested mappings (missing keys take defaults)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config expects a mapping, got {_show(d)}")
    return _build(Config, d, "")


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists), JSON-serialisable and accepted by config_from_dict."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"invalid YAML: {problem}{where}".split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: safe_load silently keeps the last one,
    so a forgotten earlier setting would win or lose unnoticed."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys written next to `<<: *base` override it; that is what merging is for
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _open_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "does not exist"
    if isinstance(err, IsADirectoryError):
        return "is a directory (expected a YAML file)"
    return err.strerror or str(err)


def _read_yaml(path: str) -> dict:
    data = read_yaml_mapping(path)
    unknown = next(_unknown_keys(data, Config, ""), None)
    if unknown is not None:
        # Name the file: the same key could also have come from an override.
        raise ConfigError(f"config file {path!r}: {_unknown_key_message(unknown, _all_keys(Config))}")
    return data


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping (duplicate keys refused), not yet checked against the schema."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"config file {path!r}: {_open_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: {_yaml_problem(e)}") from None
    if data is None:  # an empty file is more likely a mistake (wrong or truncated file) than a wish for defaults
        raise ConfigError(f"config file {path!r}: holds no settings (expected a mapping of config keys)")
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r}: expected a mapping of keys, got {type(data).__name__}")
    return dict(data)


def apply_override(data: dict, item: str) -> None:
    """Set one `a.b=value` override in a nested config mapping (the key checked against the schema)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-5")
    key, _, text = item.partition("=")
    key = key.strip()
    leaves = _leaf_types(Config)
    if key not in leaves:
        if key in _field_types(Config):
            raise ConfigError(f"override {key!r} names a section; set its fields, e.g. '{key}.<field>=...'")
        raise ConfigError(_unknown_key_message(key, _all_keys(Config)))
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text  # let type conversion report it against the key
    if leaves[key] is str and not isinstance(value, str):
        # `run_dir=2024` or `model.path=` should mean the literal text, not int/None.
        value = text.strip()

    *parents, leaf = key.split(".")
    node, path = data, ""
    for part in parents:
        path += part
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"'{path}' expects a mapping, got {_show(child)}")
        node[part] = child = dict(child)  # copy so the caller's mapping is left alone
        node, path = child, path + "."
    node[leaf] = value


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None = all defaults) and apply `a.b=value` overrides, last one wins."""
    if isinstance(overrides, str):  # a bare string would be split into characters
        overrides = (overrides,)
    data = _read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data)


def _help_lines(cls: type, prefix: str, lines: list[str]) -> None:
    for f in fields(cls):
        tp, key, doc = _field_types(cls)[f.name], prefix + f.name, f.metadata.get("help", "")
        if is_dataclass(tp):
            lines += ["", f"{key}: {doc}"]
            _help_lines(tp, f"{key}.", lines)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {key:<26} {_type_label(tp):<28} default {json.dumps(_plain(default))}")
            lines.append(f"      {doc}")


def config_help() -> str:
    """Every config key with its type, default and a short description."""
    lines = ["Config keys (set in a YAML file or override with key=value, e.g. optim.lr=1e-5):", ""]
    _help_lines(Config, "", lines)
    return "\n".join(lines)
