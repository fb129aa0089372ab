"""What the dpo stage adds to the training stage (`stages/train.py`): its step and evaluation with their settings,
and the frozen reference policy, either held on the mesh and passed to every step or, with
dpo.precompute_reference, scored once into per-example tables that the batches carry."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import safetensors
import safetensors.numpy

from rlhf_jax.config import Config, config_to_dict
from rlhf_jax.data.pipeline import eval_batches, open_split
from rlhf_jax.data.prepare import dataset_dir
from rlhf_jax.models.checkpoint import LoadedModel, check_role, model_fingerprint
from rlhf_jax.models import lora
from rlhf_jax.models.tiny import resolve_model_path
from rlhf_jax.models.transformer import Transformer, without_adapters
from rlhf_jax.rl import dpo
from rlhf_jax.runtime import distributed, fsio, sharding
from rlhf_jax.stages.policy_common import check_reference, reference_params
from rlhf_jax.training.state import param_shardings, to_global


def settings(cfg: Config) -> dpo.DPOSettings:
    return dpo.DPOSettings(beta=cfg.dpo.beta, loss=cfg.dpo.loss, label_smoothing=cfg.dpo.label_smoothing)


def step_fns(cfg: Config, model: Transformer, optimizer, schedule):
    """(step, eval_sums): `step(state, batch, rng, frozen, *reference)` and `eval_sums(params, batch,
    *reference)`, where `reference` is (reference params,), or () when the batches carry the precomputed
    `ref_logps`."""
    s = settings(cfg)
    step = functools.partial(dpo.dpo_step, model=model, optimizer=optimizer, schedule=schedule,
                             accum=cfg.optim.grad_accum_steps, settings=s)
    eval_sums = functools.partial(dpo.dpo_eval_sums, model=model, settings=s)
    if not cfg.dpo.precompute_reference:
        return step, eval_sums
    return (lambda state, batch, rng, frozen: step(state, batch, rng, frozen, None),
            lambda params, batch: eval_sums(params, batch, None))


def reference_host_params(cfg: Config, loaded: LoadedModel, model: Transformer, policy_params: dict) -> dict:
    """The reference's host params, checked before anything is placed: model.path must be a policy, and
    dpo.reference (default: model.path) one of its architecture and tokenizer."""
    check_role(loaded, f"model.path={cfg.model.path}", "policy")
    check_reference(cfg.dpo.reference, "dpo.reference", loaded, cfg.data.chat_template)  # its template, its prompts
    return reference_params(cfg.dpo.reference, "dpo.reference", loaded, model, policy_params, cfg.seed)


class Reference:
    """The frozen inputs of a training stage's step beyond its state and batch: none for sft and rm (`none()`);
    for dpo, the reference policy (dpo.reference, default model.path). Live, its params sit on the mesh with the
    policy's shardings and are the step's and the evaluation's extra argument (`frozen`, `shardings`).
    Precomputed, it scores every response of the given splits once before training, its params are then
    dropped, and the batches carry each example's `ref_logps` (B, K), looked up by `example_index`."""

    def __init__(self, frozen: tuple = (), shardings: tuple = (), tables: dict | None = None,
                 models: dict | None = None):
        self.frozen, self.shardings, self.tables, self.models = frozen, shardings, tables or {}, models or {}

    @classmethod
    def none(cls) -> "Reference":
        return cls()

    @classmethod
    def build(cls, cfg: Config, run_dir: Path, host: dict | None, model: Transformer, mesh, tokenizer,
              batch_size: int, splits: tuple[str, ...], frozen=None, frozen_sh=None) -> "Reference":
        """dpo's reference from its host params (`reference_host_params`; None: sft and rm have none) placed
        with the policy's shardings; precomputed, over `splits` in batches of `batch_size` prompts, or read from
        the run's TABLES file when it holds the tables of the same reference, data and settings (a resumed run).
        A LoRA policy's default reference is its own base, `frozen` (on the mesh already, shardings
        `frozen_sh`): the same buffers, no second copy (but of the weights lora.also_train trains, as they were)."""
        if host is None:
            return cls.none()
        models = {"dpo.reference": cfg.dpo.reference} if cfg.dpo.reference else {}
        if cfg.dpo.precompute_reference:
            path, key = run_dir / TABLES, tables_key(cfg, run_dir, splits)
            tables = stored_tables(path, key)
            if not distributed.any_process(tables is None):  # every process has them: none scores
                print(f"dpo.precompute_reference: the reference's log-probs from {path}", file=sys.stderr)
                return cls(tables=tables, models=models)
        plain = without_adapters(model)
        if model.lora is not None and not cfg.dpo.reference:  # the base, with what lora.also_train trains as it was
            extras_sh = lora.also_trained(param_shardings(model, mesh), model.lora)
            params = lora.join(sharding.place(lora.also_trained(host, model.lora), extras_sh), frozen)
            params_sh = lora.join(extras_sh, frozen_sh)
        else:  # its own buffers: the policy's are donated every step
            params_sh = param_shardings(plain, mesh)
            params = sharding.place(host if model.lora is None else lora.without_adapters(host), params_sh)
        if not cfg.dpo.precompute_reference:
            return cls((params,), (params_sh,), models=models)
        score = sharding.jit(functools.partial(dpo.response_logprobs, plain), mesh,
                             out_shardings=sharding.replicated(mesh))
        tables = {split: score_split(score, params, cfg, split, tokenizer, batch_size, mesh) for split in splits}
        if distributed.is_primary():  # kept for a resumed run: scoring a split is a forward pass over all of it
            fsio.write_bytes_atomically(path, safetensors.numpy.save(tables, metadata={"key": key}))
        return cls(tables=tables, models=models)  # the params go out of scope here: freed

    def train_batches(self, data_iter, split: str):
        return WithReference(data_iter, self.tables[split]) if self.tables else data_iter

    def eval_batches(self, batches: Iterator[dict], split: str) -> Iterator[dict]:
        if not self.tables:
            return batches
        return (with_ref_logps(batch, self.tables[split]) for batch in batches)


TABLES = "reference_logps.safetensors"  # in the run directory: dpo.precompute_reference's tables, by split


def tables_key(cfg: Config, run_dir: Path, splits: tuple[str, ...]) -> str:
    """A digest of what the precomputed tables depend on: the reference's files, the prepared dataset's, the data
    and model settings, and the splits."""
    config = config_to_dict(cfg)
    reference = cfg.dpo.reference or resolve_model_path(cfg.model.path, run_dir, cfg.seed)
    parts = {"reference": model_fingerprint(reference),
             "dataset": model_fingerprint(dataset_dir(cfg.data.dir, cfg.data.name)),
             "data": config["data"], "model": config["model"], "splits": list(splits)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def stored_tables(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The tables stored at `path` under `key`; None when there are none, or they are of another key or unreadable
    (then they are scored again)."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {split: f.get_tensor(split) for split in f.keys()}
    except (OSError, safetensors.SafetensorError):
        return None


def score_split(score, params, cfg: Config, split: str, tokenizer, batch_size: int, mesh) -> np.ndarray:
    """ref_logps_NK: `score(params, batch)` (B, K) of every example of `split`, by its stored index."""
    source, _ = open_split(cfg.data.dir, cfg.data.name, split)
    table = None
    for batch in eval_batches(cfg.data, split, tokenizer, batch_size):
        # every process's rows and their indices, gathered the same way
        logps, index, valid = distributed.to_host((
            score(params, to_global(batch, mesh)),
            *(to_global({k: batch[k]}, mesh)[k] for k in ("example_index", "valid"))))
        if table is None:
            table = np.zeros((len(source), logps.shape[1]), np.float32)
        table[index[valid]] = logps[valid]
    return table


def with_ref_logps(batch: dict, table: np.ndarray) -> dict:
    return {**batch, "ref_logps": table[batch["example_index"]]}


class WithReference:
    """A training data iterator whose batches carry their precomputed `ref_logps`; its state is the inner one's."""

    def __init__(self, data_iter, table: np.ndarray):
        self.data_iter, self.table = data_iter, table

    def __next__(self) -> dict:
        return with_ref_logps(next(self.data_iter), self.table)

    def get_state(self):
        return self.data_iter.get_state()

    def set_state(self, state) -> None:
        self.data_iter.set_state(state)
