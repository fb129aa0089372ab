"""Params-only model checkpoints (Orbax) and loading a model from either format.

Layout of a model checkpoint directory:
  params/      Orbax PyTree checkpoint of the parameter tree
  model.json   {"format": "rlhf_jax.model", "config": ModelConfig, "head": "lm" | "scalar",
                "role": "policy" | "reward" | "value" (absent in older exports), ...}
  tokenizer/   the HF tokenizer files (and generation_config.json) the model was built with
A checkpoint is written under a temporary name and renamed into place, so a crash never leaves a half one,
and an overwrite replaces the old directory as a whole (fsio.replace_dir).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import UserError, memory_error_in, os_error_message, os_reason
from rlhf_jax.models import hf
from rlhf_jax.models.hf_config import read_json
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.runtime import distributed, fsio

FORMAT = "rlhf_jax.model"
# What an export is for, so that a model read by role (a reward model, a policy) is never another kind of model
# with the same head: a value model (ppo's export_value) is no reward model.
ROLES = {"policy": "a policy", "reward": "a reward model", "value": "a value model (a ppo run's export_value)"}
# Whether the model trained on prompts in its tokenizer's chat template (data.chat_template), as its export records
CHAT_TEMPLATE = "trained_with_chat_template"


class LoadedModel(NamedTuple):
    cfg: ModelConfig
    head: str
    params: dict  # numpy arrays
    tokenizer_dir: Path | None
    extra: dict = {}  # e.g. {"reward_norm": {"gain": g, "bias": b}} of a reward model


class CheckpointError(UserError):
    """A path that is neither a rlhf_jax model checkpoint nor a HF checkpoint directory."""


class UnrestorableCheckpoint(CheckpointError):
    """A training checkpoint that cannot be read back (truncated, half-written, an item missing)."""


def model_config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ()))})


def save_model(out_dir: str | os.PathLike, params, cfg: ModelConfig, head: str = "lm",
               tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
               extra: dict | None = None) -> Path:
    """Write a model checkpoint directory as a whole (fsio.replace_dir): an existing non-empty one is refused
    unless `overwrite`, and is then replaced, never mixed; a failed write (a full disk) leaves it as it was."""
    digest = weights_digest(params)  # every process: a collective over sharded params
    with fsio.replace_dir(out_dir, overwrite) as tmp:
        _save_params(tmp / "params", params)  # with several processes: each writes its shards
        if jax.process_index() != 0:
            return Path(out_dir).resolve()  # process 0 writes the rest and swaps the directory in
        (tmp / "model.json").write_text(json.dumps(
            {"format": FORMAT, "config": model_config_to_json(cfg), "head": head, **(extra or {}),
             "weights_digest": digest}, indent=2))
        names = [n for n in hf.TOKENIZER_FILES if tokenizer_dir is not None and (Path(tokenizer_dir) / n).is_file()]
        if names:
            (tmp / "tokenizer").mkdir()
        for name in names:
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / "tokenizer" / name)
    return Path(out_dir).resolve()


@jax.jit
def _bit_sums(x: jax.Array) -> jax.Array:
    """Two sums of an array's values' bits as uint32, wrapping (exact, so the same however the array is sharded or
    the sum ordered): plain, and weighted by position (which a permutation changes)."""
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
    position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):
        position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.stack([jnp.sum(bits), jnp.sum(bits * (position % jnp.uint32(65521) + jnp.uint32(1)))])


def weights_digest(params) -> str:
    """A digest of the weights' values (paths, shapes, dtypes and `_bit_sums`), the same for the same weights
    however they were sharded or written: Orbax names its data files at random, so files alone cannot tell a
    re-export of the same weights from other weights."""
    digest = hashlib.sha256()
    for path, leaf in sorted((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)):
        sums = jax.device_get(_bit_sums(leaf)).tolist()  # one array at a time on the device: no second copy of all
        digest.update(f"{path}{tuple(leaf.shape)}{jnp.dtype(leaf.dtype).name}{sums}".encode())
    return digest.hexdigest()


def _checkpointer() -> ocp.Checkpointer:
    """Orbax over every process (each writes its shards), or this process alone (`distributed.alone`)."""
    if not distributed.acting_alone():
        return ocp.PyTreeCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"alone{me}")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                            multiprocessing_options=options)


def _save_params(path: Path, params) -> None:
    with _orbax_quietly(), _checkpointer() as ckptr:
        try:
            ckptr.save(path, params)
        except ValueError as e:  # tensorstore reports I/O errors (a full disk) as ValueErrors
            raise OSError(os_reason(e)) from None


def _load_params(params_dir: Path) -> dict:
    """The numpy parameter tree of an Orbax params dir; a missing, truncated or corrupt one is one line."""
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: does not exist (an incomplete model checkpoint)")
    try:
        with _orbax_quietly(), _checkpointer() as ckptr:
            meta = ckptr.metadata(params_dir)
            item = getattr(meta, "item_metadata", meta)
            tree = getattr(item, "tree", item)
            if tree is None:
                raise ValueError("its metadata (_METADATA, manifest.ocdbt) is missing or unreadable")
            target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
            # read as host arrays whatever mesh wrote them (exports are written shard by shard)
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            params = ckptr.restore(params_dir, item=target, restore_args=as_numpy)
    except Exception as e:  # noqa: BLE001 - corrupt files fail in many ways deep inside orbax and tensorstore
        if memory_error_in(e) is not None:  # this host's, not the checkpoint's
            raise memory_error_in(e) from None
        raise CheckpointError(f"{params_dir}: corrupt or truncated Orbax checkpoint ({os_reason(read_failure(e))})"
                              ) from None
    return jax.tree.map(np.asarray, params)


@contextlib.contextmanager
def _orbax_quietly():
    """Orbax logs a failed read or write at length (absl tracebacks) before raising it, and the calls it left
    in flight print more tracebacks later; the caller reports the failure in one line instead."""
    _drop_abandoned_call_noise()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _is_abandoned_call_noise(text: str) -> bool:
    first = text.split("\n", 1)[0]  # "Task exception was never retrieved", "Future ...", "_GatheringFuture ..."
    # a tensorstore read's future names its driver or spec, not orbax
    return text == "Event loop is closed" or (first.endswith("exception was never retrieved") and any(
        word in text.lower() for word in ("orbax", "tensorstore", "ocdbt", '"zarr"')))


def _is_orbax_failure_log(record: logging.LogRecord) -> bool:
    """Orbax's own error log of a failed asynchronous save (its background threads log the tracebacks before the
    failure is raised to the caller, who reports it in one line)."""
    return record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname


def read_failure(error: BaseException) -> BaseException:
    """The error behind Orbax's wrapper of a failed array read, whose own message names only the array's slices
    and a TensorStore spec: TensorStore's, which names the file and what is wrong with it."""
    while "See full TensorStore details" in str(error) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def _drop_abandoned_call_noise() -> None:
    """Drop (only) what orbax's abandoned reads and writes raise in threads after a failure: 'Event loop is
    closed' errors (printed as tracebacks by sys.unraisablehook), asyncio's 'exception was never retrieved'
    logs of orbax tasks, and orbax's error logs from its save threads. Installed once."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_call_noise", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and _is_abandoned_call_noise(str(unraisable.exc_value)):
            return
        if _is_orbax_coroutine(unraisable.object):  # an abandoned read's, collected after its failure was reported
            return
        previous(unraisable)

    hook.drops_abandoned_call_noise = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda record: not _is_abandoned_call_noise(record.getMessage()))
    logging.getLogger("absl").addFilter(lambda record: not _is_orbax_failure_log(record))


def _is_orbax_coroutine(thing) -> bool:
    code = getattr(thing, "cr_code", None)
    return code is not None and any(part in code.co_filename for part in ("/orbax/", "/tensorstore/"))


def read_model_meta(ckpt_dir: Path) -> tuple[ModelConfig, str, dict]:
    path = ckpt_dir / "model.json"
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    try:
        cfg, head = model_config_from_json(meta["config"]), meta["head"]
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid \"config\" ({e})") from None
    if head not in ("lm", "scalar"):
        raise CheckpointError(f"{path}: head {head!r}, expected 'lm' or 'scalar'")
    if meta.get("role", "policy") not in ROLES:
        raise CheckpointError(f"{path}: role {meta['role']!r}, expected one of {sorted(ROLES)}")
    extra = {k: v for k, v in meta.items() if k not in ("format", "config", "head", "weights_digest")}
    return cfg, head, extra


def load_model(path: str | os.PathLike, need_tokenizer: bool = False, key: str = "") -> LoadedModel:
    """Load a rlhf_jax model checkpoint or a HF checkpoint dir as numpy params (placed on a mesh by the caller).
    Its tokenizer_dir is None when it has no tokenizer (refused with `need_tokenizer`); a tokenizer with more ids
    than vocab_size is refused. `key`: the config key that gave `path`, which its one-line errors then name."""
    return _read_model(path, need_tokenizer, _load_model, key)


def model_meta(path: str | os.PathLike, need_tokenizer: bool = False, key: str = "") -> LoadedModel:
    """A model directory without its weights (params None): config, head, tokenizer directory and extras read
    from its metadata alone, with load_model's errors for what is not a model directory."""
    return _read_model(path, need_tokenizer, _model_meta, key)


def _read_model(path, need_tokenizer: bool, read, key: str = "") -> LoadedModel:
    try:
        try:
            _refuse_non_model(Path(path))
            loaded = read(Path(path).resolve())
        except OSError as e:  # an unreadable file or directory
            raise CheckpointError(f"{path}: cannot read ({os_error_message(e)})") from None
        if need_tokenizer and loaded.tokenizer_dir is None:
            raise CheckpointError(f"{path}: has no tokenizer files (tokenizer.json, vocab.json or tokenizer.model); "
                                  "training and generation need them")
    except UserError as e:
        if key:  # `/x: does not exist` -> `model.path=/x: does not exist`, the path as given, once
            text = str(e)
            for shown in (str(path), str(Path(path).resolve())):
                text = text.removeprefix(f"{shown}: ")
            e.args = (f"{key}={path}: {text}",)
        raise
    return loaded


def model_head(path: str | os.PathLike) -> str:
    """'lm' or 'scalar' of a model directory, read from its metadata alone (no weights)."""
    return model_meta(path).head


def _model_meta(path: Path) -> LoadedModel:
    if (path / "model.json").exists():
        cfg, head, extra = read_model_meta(path)
        tok = path / "tokenizer"
        return LoadedModel(cfg, head, None, tok if hf.has_tokenizer(tok) else None, extra)
    if (path / "config.json").exists():
        cfg, head = hf.read_config(path)
        extra = {k: v for k, v in read_json(path / "config.json").items()  # config.json extras of our exports
                 if k == "reward_norm" or (k == "role" and v in ROLES)
                 or (k == CHAT_TEMPLATE and isinstance(v, bool))}
        return LoadedModel(cfg, head, None, path if hf.has_tokenizer(path) else None, extra)
    raise CheckpointError(f"{path}: expected a rlhf_jax checkpoint (model.json) or a HF checkpoint dir "
                          "(config.json)")


def _load_model(path: Path) -> LoadedModel:
    meta = _model_meta(path)
    if (path / "model.json").exists():
        loaded, where = meta._replace(params=_load_params(path / "params")), path / "model.json"
        _check_shapes(loaded, path / "params")
    else:
        loaded = meta._replace(params=hf.read_params(path, meta.cfg, meta.head))
        where = path / "config.json"
    _check_vocab(loaded, where)
    return loaded


def _check_shapes(loaded: LoadedModel, params_dir: Path) -> None:
    """The weights against the model.json beside them: a config that does not describe them (hand-edited, or
    copied from another model) is one line, not a wrong export or a traceback deep in flax."""
    from rlhf_jax.models.transformer import init_params, make_model

    model = make_model(loaded.cfg, loaded.head, scan_layers=False)  # checkpoints hold the per-layer layout
    expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    name = lambda key_path: jax.tree_util.keystr(key_path, simple=True, separator="/")
    want = {name(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {name(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(loaded.params)}
    for key in sorted(want.keys() | got.keys()):
        if key not in got:
            raise CheckpointError(f"{params_dir}: no {key}, which model.json's model has {want[key]}")
        if key not in want:
            raise CheckpointError(f"{params_dir}: {key} {got[key]} is not in model.json's model")
        if got[key] != want[key]:
            raise CheckpointError(f"{params_dir}: {key} has shape {got[key]}, model.json's model {want[key]}")


def check_role(loaded: LoadedModel, key: str, *expected: str) -> None:
    """Refuses a model whose recorded role is not one of `expected` (`key` names where it was given, e.g.
    'ppo.reward_model=PATH'); an export without a role (older runs, other tools) is accepted."""
    role = loaded.extra.get("role")
    if role is not None and role not in expected:
        raise CheckpointError(f"{key}: {ROLES[role]}, expected {' or '.join(ROLES[r] for r in expected)}")


def warn_prompt_form(loaded: LoadedModel, chat_template: bool, where: str) -> None:
    """One warning line when a model trained on prompts in its tokenizer's chat template is used without it, or the
    other way round: it runs, but reads prompts in a form it never saw (a chat policy answering bare text, a reward
    model scoring templated text). Models whose export does not record it (HF imports, older exports) pass."""
    trained = loaded.extra.get(CHAT_TEMPLATE)
    if not isinstance(trained, bool) or trained == chat_template:
        return
    wrapped = "prompts wrapped in its tokenizer's chat template"
    learned, given = (wrapped, "bare prompts") if trained else ("bare prompts", wrapped)
    flag = "--chat-template" if trained else "leave out --chat-template"
    print(f"warning: {where}: trained on {learned}, given {given} here: set data.chat_template: "
          f"{str(trained).lower()} (evaluate, generate: {flag}) to give it prompts as it learned them", file=sys.stderr)


# Small files (metadata, tokenizer) whole, weight files by size and 3 fixed slices: cheap at 8B, blind to mtimes
_WHOLE_BYTES, _SLICE_BYTES = 1 << 20, 1 << 16


def model_fingerprint(path: str | os.PathLike) -> str:
    """A digest of the files of a model directory (hidden files, such as a swap's leftovers, excluded); of an
    export whose model.json records its `weights_digest`, the files but its Orbax params, which that digest
    stands for (the same weights written again are the same model)."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    try:
        skip = {"params"} if _records_weights_digest(root) else set()
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts)
                       and p.relative_to(root).parts[0] not in skip)
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
            with open(file, "rb") as f:
                if size <= _WHOLE_BYTES:
                    digest.update(f.read())
                    continue
                for offset in (0, size // 2, size - _SLICE_BYTES):
                    f.seek(offset)
                    digest.update(f.read(_SLICE_BYTES))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({os_error_message(e)})") from None
    return digest.hexdigest()


def _records_weights_digest(root: Path) -> bool:
    try:
        meta = json.loads((root / "model.json").read_text())
    except (OSError, ValueError):  # no model.json (an HF directory, a dataset), or not one of ours
        return False
    return isinstance(meta, dict) and isinstance(meta.get("weights_digest"), str)


def _check_vocab(loaded: LoadedModel, where: Path) -> None:
    """Token ids past vocab_size would silently be embedded as id 0 (the model remaps out-of-range ids)."""
    n = hf.tokenizer_vocab_size(loaded.tokenizer_dir) if loaded.tokenizer_dir is not None else None
    if n is not None and n > loaded.cfg.vocab_size:
        raise CheckpointError(f"{where}: vocab_size {loaded.cfg.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({n} ids) in {loaded.tokenizer_dir}")


def restore_params(state_dir: Path, keys: tuple[str, ...]) -> dict:
    """The subtree `keys` of a saved train state as numpy arrays (the optimizer state is never read); a
    checkpoint that cannot be restored (truncated, half-written) is one line."""
    state_dir = state_dir.absolute()  # Orbax reads only absolute paths
    try:
        with _orbax_quietly():
            tree = ocp.PyTreeCheckpointHandler().metadata(state_dir)
            tree = tree.tree if hasattr(tree, "tree") else tree
            for key in keys:
                tree = tree[key]
            item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
            for key in reversed(keys):
                item = {key: item}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            out = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # noqa: BLE001 - corrupt files fail in many ways deep inside orbax and tensorstore
        if memory_error_in(e) is not None:  # this host's, not the checkpoint's
            raise memory_error_in(e) from None
        raise UnrestorableCheckpoint(_first_line(read_failure(e))) from None
    for key in keys:
        out = out[key]
    return out


def _refuse_non_model(path: Path) -> None:
    """One clear line for a path that is not a model directory: missing, a file, a training run directory or
    one of its training checkpoints."""
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, expected a model directory (with model.json or config.json)")
    if (path / "model.json").exists():
        return
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        merged = path.parent / path.name.replace("_adapter", "")
        use = f"use {merged}, the run's merged model" if merged != path and merged.is_dir() else "use a merged model"
        raise CheckpointError(f"{path}: is a PEFT adapter (LoRA weights alone, no base model); {use}")
    if (path / "checkpoints").is_dir() and not hf.has_weights(path):
        raise CheckpointError(f"{path}: is a training run directory; {_run_model_hint(path)}")
    if path.name == "checkpoints" and any(p.name.isdigit() for p in path.iterdir()):
        raise CheckpointError(f"{path}: holds the training checkpoints of run {path.parent}, not a model; "
                              f"{_run_model_hint(path.parent)}")
    if path.parent.name == "checkpoints" and path.name.isdigit():
        run = path.parent.parent
        raise CheckpointError(f"{path}: is a training checkpoint (the train state at step {path.name}), not a "
                              f"model; {_run_model_hint(run)}")


def _run_model_hint(run: Path) -> str:
    """Where a training run's model is: export/ when it finished, else best/."""
    if (run / "export").is_dir():
        return f"use {run / 'export'}"
    if (run / "best").is_dir():
        return f"it has no export/ yet (training has not finished): use {run / 'best'} or finish the training"
    return "it has no export/ yet: rerun its training to finish it and write export/"


class TrainCheckpoints:
    """Orbax CheckpointManager over one training run: the train state, the data iterator's state, a small JSON
    of loop facts (best eval so far, seed) and the resolved config are saved together, asynchronously, keeping
    the newest and the newest on the save cadence, `keep` in all (`prune`).
    Orbax writes each step under a temporary name and renames it when complete, so a kill mid-save leaves
    the previous checkpoint as the latest. A failed save (a full or unwritable disk) is one UserError naming
    the directory and the step; its partial directory is removed and the checkpoints before it stay."""

    def __init__(self, directory: str | os.PathLike, keep: int, save_every: int = 0):
        self.directory = Path(directory).resolve()
        self.keep, self.save_every = keep, save_every
        self.in_flight: int | None = None  # the step being written in the background
        if self.directory.exists() and not self.directory.is_dir():  # else found only at the first save
            raise UserError(f"{self.directory}: is a file, expected the run's checkpoint directory; move it away")
        _drop_abandoned_call_noise()
        if distributed.is_primary():
            self._remove_unfinished()
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "loop": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise UserError(f"checkpoints: {os_error_message(e)}") from None

    def _remove_unfinished(self) -> None:
        """A save the process was killed in leaves its step under Orbax's temporary name, which Orbax removes with
        a raw log line when it saves that step again: removed here, in words."""
        for unfinished in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
            print(f"note: removing {unfinished}: a checkpoint whose save never finished (the run was killed while "
                  "writing it)", file=sys.stderr)
            shutil.rmtree(unfinished, ignore_errors=True)

    def steps(self) -> list[int]:
        """Complete saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, loop: dict, config: dict) -> None:
        self.wait()  # the previous save's failure is reported as that step's
        # copies: Orbax serialises the JSON items in its background thread, after the loop has gone on (and
        # changed its facts) on slow storage
        data_state, loop, config = copy.deepcopy((data_state, loop, config))
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state),
                                                            loop=ocp.args.JsonSave(loop),
                                                            config=ocp.args.JsonSave(config)))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore fail in many ways
            raise self._save_error(step, e) from None
        self.in_flight = step

    def wait(self) -> None:
        """Blocks until every save has been written (an async save's error is raised here)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self.in_flight, e) from None
        finally:
            saved, self.in_flight = self.in_flight is not None, None
        if saved:  # only a run that saves prunes; reading checkpoints deletes nothing
            self.prune()

    def prune(self) -> None:
        """Keeps the newest complete checkpoint and, up to `keep` in all, the newest of the save cadence: one saved
        off it (a stop signal's) goes once a newer one is complete, so that a stopped and resumed run keeps the
        checkpoints an unstopped one keeps (`eval.all_steps` evaluates the same steps)."""
        steps = self.steps()
        kept = set(steps[:1])
        for step in steps:
            if len(kept) >= self.keep:
                break
            if self.save_every and step % self.save_every == 0:
                kept.add(step)
        for step in steps:
            if step not in kept:
                self.manager.delete(step)

    def _save_error(self, step: int | None, error: Exception) -> UserError:
        """One line for a failed save, once its partial directory (orbax's temporary name) is removed."""
        if jax.process_index() == 0:
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                fsio.remove_dir(partial)
        reason = os_error_message(error) if isinstance(error, OSError) else os_reason(error)
        kept = self.latest_step()
        what = f"step {step}" if step is not None else "a checkpoint"
        return UserError(f"{self.directory}: saving {what} failed ({reason}); "
                         f"{f'step {kept} is the last complete checkpoint' if kept else 'no checkpoint was saved'}")

    def stored(self, step: int) -> tuple[dict | None, tuple[dict, list], dict]:
        """(the config saved with `step`, or None; shapes of its state: {param path: shape} and the sorted
        shapes of everything else; its loop facts), read without restoring any array."""
        meta = self.manager.item_metadata(step)
        tree = meta.state.tree if hasattr(meta.state, "tree") else meta.state
        if not tree:  # the state's metadata file is missing (a half-copied directory): every parameter unknown
            raise UnrestorableCheckpoint(f"step {step}: its state has no metadata")
        items = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                                   loop=ocp.args.JsonRestore()))
        return items.config, state_shapes(tree), items.loop or {}

    def restore(self, step: int, like_state):
        """(state placed like `like_state`, data iterator state, loop facts) of a saved step."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 data=ocp.args.JsonRestore(),
                                                                 loop=ocp.args.JsonRestore()))
        return out.state, out.data, out.loop

    def set_aside(self, step: int, dest: Path) -> Path:
        """Move an unrestorable step out of the way (kept for inspection) so the run can save that step again."""
        target = dest / f"step_{step}"
        if jax.process_index() == 0:  # with several processes, one moves it and all wait for the move
            dest.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(self.directory / str(step), target)
        distributed.barrier(f"set aside step {step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.wait()
        self.manager.close()


def state_shapes(tree) -> tuple[dict, list]:
    """A train state's (or its metadata's) shapes: {'/'-joined param path: shape}, and the sorted shapes of
    the other leaves (optimizer moments, step), whose container types differ between a state and metadata. A
    state of several models (PPO's policy and value) names each one's params by its model: `value/score/w`."""
    def key(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    params, other = {}, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [key(p) for p in path]
        shape = tuple(int(d) for d in leaf.shape)
        if "params" in names:
            i = names.index("params")
            params["/".join(names[:i] + names[i + 1:])] = shape
        else:
            other.append(shape)
    return params, sorted(other)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
