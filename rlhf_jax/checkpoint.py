"""Params-only model checkpoints (Orbax) and loading a model from either format.

Layout of a model checkpoint directory:
  params/      Orbax PyTree checkpoint of the parameter tree
  model.json   {"format": "rlhf_jax.model", "config": ModelConfig, "head": "lm" | "scalar"}
  tokenizer/   the HF tokenizer files (and generation_config.json) the model was built with
A checkpoint is written under a temporary name and renamed into place, so a crash never leaves a half one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import hf
from rlhf_jax.errors import UserError
from rlhf_jax.model import ModelConfig

FORMAT = "rlhf_jax.model"


class LoadedModel(NamedTuple):
    cfg: ModelConfig
    head: str
    params: dict  # numpy arrays
    tokenizer_dir: Path | None
    extra: dict = {}  # e.g. {"reward_norm": {"gain": g, "bias": b}} of a reward model


class CheckpointError(UserError):
    """A path that is neither a rlhf_jax model checkpoint nor a HF checkpoint directory."""


def save_model(out_dir: str | os.PathLike, params, cfg: ModelConfig, head: str = "lm",
               tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
               extra: dict | None = None) -> Path:
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite to replace it)")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp / "params", params)
    (tmp / "model.json").write_text(json.dumps(
        {"format": FORMAT, "config": hf.model_config_to_json(cfg), "head": head, **(extra or {})}, indent=2))
    if tokenizer_dir is not None:
        (tmp / "tokenizer").mkdir()
        for name in hf.TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / "tokenizer" / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_model_meta(ckpt_dir: Path) -> tuple[ModelConfig, str, dict]:
    meta = json.loads((ckpt_dir / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir / 'model.json'}: not a {FORMAT} file")
    extra = {k: v for k, v in meta.items() if k not in ("format", "config", "head")}
    return hf.model_config_from_json(meta["config"]), meta["head"], extra


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a rlhf_jax model checkpoint or a HF checkpoint dir as numpy params (placed on a mesh by the caller)."""
    path = Path(path).resolve()
    if (path / "model.json").exists():
        cfg, head, extra = read_model_meta(path)
        tok = path / "tokenizer"
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path / "params")
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
            params = ckptr.restore(path / "params", item=target)
        return LoadedModel(cfg, head, jax.tree.map(np.asarray, params), tok if tok.is_dir() else None, extra)
    if (path / "config.json").exists():
        cfg, head, params = hf.load_hf(path)
        extra = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k == "reward_norm"}
        return LoadedModel(cfg, head, params, path, extra)
    raise CheckpointError(f"{path}: expected a rlhf_jax checkpoint (model.json) or a HF checkpoint dir (config.json)")


class TrainCheckpoints:
    """Orbax CheckpointManager over one training run: the train state, the data iterator's state, a small JSON
    of loop facts (best eval so far, seed) and the resolved config are saved together, asynchronously, keeping
    the last N.
    Orbax writes each step under a temporary name and renames it when complete, so a kill mid-save leaves
    the previous checkpoint as the latest."""

    def __init__(self, directory: str | os.PathLike, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options,
                                             item_names=("state", "data", "loop", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, loop: dict, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state),
                                                        loop=ocp.args.JsonSave(loop),
                                                        config=ocp.args.JsonSave(config)))

    def restore(self, step: int, like_state):
        """(state placed like `like_state`, data iterator state, loop facts) of a saved step."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 data=ocp.args.JsonRestore(),
                                                                 loop=ocp.args.JsonRestore()))
        return out.state, out.data, out.loop

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
