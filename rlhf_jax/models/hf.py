"""Hugging Face checkpoint directories: reading one (config.json, safetensors files or a sharded index) into a
ModelConfig and params, and writing one that `transformers` loads, tokenizer files included, with a reward model's
pad id and reward gain made safe for transformers' sequence classification. No torch, no code execution.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from rlhf_jax.errors import os_reason
from rlhf_jax.models.hf_config import HFFormatError, config_from_hf, config_to_hf, read_json
from rlhf_jax.models.hf_weights import params_from_hf, params_to_hf
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.runtime import fsio

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   "added_tokens.json")


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: model.safetensors or those of a sharded index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFormatError(f"{index}: no \"weight_map\" of tensor names to files")
        files = [model_dir / name for name in sorted(set(map(str, weight_map.values())))]
        missing = next((f for f in files if not f.exists()), None)
        if missing is not None:
            raise HFFormatError(f"{missing}: file not found (listed in {index.name})")
        return files
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = f" (found {found[0]}: pickle formats are not loaded; re-save with safe_serialization)" if found else ""
    raise HFFormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def has_weights(model_dir: Path) -> bool:
    """Whether a directory holds HF safetensors weights."""
    return any((model_dir / n).exists() for n in ("model.safetensors", "model.safetensors.index.json"))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise HFFormatError(f"{path}: is a directory, expected a safetensors file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: _tensor(f, key, path) for key in f.keys()}
    except SafetensorError as e:
        raise HFFormatError(f"{path}: corrupt or truncated safetensors file ({os_reason(e)})") from None
    except OSError as e:
        raise HFFormatError(f"{path}: cannot read ({os_reason(e)})") from None


def _tensor(opened, key: str, path: Path) -> np.ndarray:
    try:
        return opened.get_tensor(key)
    except (AttributeError, TypeError, ValueError):  # a dtype numpy has no type for (float8 of quantized releases)
        raise HFFormatError(f"{path}: tensor {key!r} has dtype {opened.get_slice(key).get_dtype()}, which is not "
                            "loaded; use the model's unquantized (bfloat16 or float32) release") from None


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint dir: model.safetensors or a sharded index. Refuses pickle formats."""
    tensors = {}
    for path in _weight_files(model_dir):
        tensors.update(_read_safetensors(path))
    return tensors


def load_hf(model_dir: str | os.PathLike, head: str | None = None) -> tuple[ModelConfig, str, dict]:
    """(ModelConfig, head, numpy params) from a transformers checkpoint directory."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise HFFormatError(f"{model_dir}: does not exist")
    if not model_dir.is_dir():
        raise HFFormatError(f"{model_dir}: is a file, expected a HF checkpoint directory")
    cfg, hf_head = read_config(model_dir)
    head = head or hf_head
    return cfg, head, read_params(model_dir, cfg, head)


def read_params(model_dir: Path, cfg: ModelConfig, head: str) -> dict:
    """The numpy params of a transformers checkpoint directory; a tensor missing, of another shape or left over
    is one line naming the directory."""
    try:
        return params_from_hf(read_tensors(model_dir), cfg, head)
    except HFFormatError as e:
        text = str(e)
        raise HFFormatError(f"{model_dir}: {text.removeprefix('weights: ')}" if text.startswith("weights: ")
                            else text) from None


def read_config(model_dir: Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, head) of a transformers checkpoint directory from its config files alone (generation_config.json's
    EOS ids win)."""
    gen_path = model_dir / "generation_config.json"
    generation = read_json(gen_path) if gen_path.exists() else None
    return config_from_hf(read_json(model_dir / "config.json"), generation, str(model_dir / "config.json"))


# ---------------------------------------------------------------------------------------------- reward models
# transformers' *ForSequenceClassification scores the rightmost token that is not config.pad_token_id, ignoring
# the attention mask, while rlhf_jax scores the last real token (an EOS for a finished response). A pad id that
# is an EOS id would make transformers skip our EOS and score the token before it.


def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    """Whether a directory holds a tokenizer's vocabulary (tokenizer.json, vocab.json or tokenizer.model)."""
    return any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model"))


def tokenizer_vocab_size(tokenizer_dir: str | os.PathLike) -> int | None:
    """1 + the largest id the tokenizer in `tokenizer_dir` has (added tokens included), read from its JSON
    files without building it; None for a sentencepiece-only tokenizer."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.json").is_file():
        spec = read_json(tokenizer_dir / "tokenizer.json")
        spec = spec if isinstance(spec, dict) else {}
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        vocab = model.get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [t.get("id") for t in spec.get("added_tokens") or [] if isinstance(t, dict)]
    elif (tokenizer_dir / "vocab.json").is_file():
        ids = [*_json_values(tokenizer_dir / "vocab.json"), *_json_values(tokenizer_dir / "added_tokens.json")]
    else:
        return None
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def _json_values(path: Path) -> list:
    """The values of a JSON object file (a token -> id map); [] when there is none."""
    data = read_json(path) if path.is_file() else {}
    return list(data.values()) if isinstance(data, dict) else []


def _tokenizer_facts(tokenizer_dir) -> tuple[int | None, int | None, int | None]:
    """(pad id, EOS id, 1 + the largest id it emits) of the tokenizer in `tokenizer_dir`; Nones without one."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if tokenizer_dir is None or not any((Path(tokenizer_dir) / n).exists() for n in names):
        return None, None, None
    from rlhf_jax.models.tokenizer import load_tokenizer  # lazy: transformers is only needed for this lookup

    tok = load_tokenizer(tokenizer_dir)
    return tok.pad_token_id, tok.eos_token_id, max(tok.get_vocab().values()) + 1


def reward_pad_id(cfg: ModelConfig, tok_pad: int | None = None, tok_size: int | None = None,
                  tok_eos: int | None = None) -> int | None:
    """The config.json pad id of a scalar-head export: never an EOS id, always < vocab_size (Llama embeds it as
    padding_idx). The model's pad if safe, else the tokenizer's pad, else an id the tokenizer never emits (so it
    can only be padding), else None: transformers then scores the last position of a single sequence and refuses
    batches, a loud error rather than a silently wrong token."""
    eos_ids = set(cfg.eos_token_ids) | {tok_eos}  # training appends the tokenizer's EOS to every ended response
    safe = lambda i: i is not None and i not in eos_ids and 0 <= i < cfg.vocab_size
    if safe(cfg.pad_token_id):
        return cfg.pad_token_id
    if safe(tok_pad):
        return tok_pad
    if tok_size is not None and tok_size < cfg.vocab_size:
        return cfg.vocab_size - 1
    return None


def fold_reward_gain(params: dict, extra: dict | None) -> tuple[dict, dict]:
    """Multiply the score weights by reward_norm's gain (HF's score Linear has no bias, so the bias stays):
    HF logits + bias = gain * raw + bias. The stored norm becomes gain 1 with the folded gain on record."""
    norm = (extra or {}).get("reward_norm")
    if not norm:
        return params, dict(extra or {})
    gain = float(norm.get("gain", 1.0))
    score = np.asarray(params["score"])
    params = {**params, "score": score * np.asarray(gain, score.dtype)}
    folded = {**norm, "gain": 1.0, "folded_gain": float(norm.get("folded_gain", 1.0)) * gain}
    return params, {**extra, "reward_norm": folded}


def _left_pad_tokenizer(out_dir: Path) -> None:
    """Make the exported tokenizer left-pad, so that its batches end in real tokens, which transformers reads
    correctly whatever id pads them (needed when the tokenizer pads with an EOS id)."""
    path = out_dir / "tokenizer_config.json"
    if path.exists():
        path.write_text(json.dumps({**read_json(path), "padding_side": "left"}, indent=2))


def save_hf(out_dir: str | os.PathLike, params: dict, cfg: ModelConfig, head: str = "lm",
            tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None, overwrite: bool = False) -> Path:
    """Write a directory that `transformers.AutoModelFor*.from_pretrained` loads, tokenizer files included, as
    a whole (fsio.replace_dir): an existing non-empty `out_dir` is refused unless `overwrite`, and is then
    replaced, never mixed with the new files; a failed write leaves it as it was. See `write_hf`."""
    with fsio.replace_dir(out_dir, overwrite) as tmp:
        write_hf(tmp, params, cfg, head, tokenizer_dir, dtype, max_shard_bytes, extra_config)
    return Path(out_dir)


def write_hf(out_dir: Path, params: dict, cfg: ModelConfig, head: str = "lm",
             tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
             max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None) -> None:
    """The files of `save_hf`, written into the existing empty directory `out_dir` (not atomically: use
    save_hf, or call this inside fsio.replace_dir).
    `extra_config` entries (a reward model's `reward_norm`) are kept as extra keys of config.json.
    A scalar head gets a pad id that is never an EOS id and its reward gain folded into the score weights."""
    out_dir = Path(out_dir)
    tok_pad = None
    if head == "scalar":
        tok_pad, tok_eos, tok_size = _tokenizer_facts(tokenizer_dir)
        cfg = dataclasses.replace(cfg, pad_token_id=reward_pad_id(cfg, tok_pad, tok_size, tok_eos))
        params, extra_config = fold_reward_gain(params, extra_config)
    tensors = params_to_hf(params, cfg, head)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    hf_cfg = config_to_hf(cfg, head)
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    hf_cfg.update(extra_config or {})
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    if len(shards) == 1:
        fsio.save_safetensors(shards[0], out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            fsio.save_safetensors(shard, out_dir / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    if head == "scalar" and tok_pad is not None and tok_pad != cfg.pad_token_id:
        _left_pad_tokenizer(out_dir)
        if cfg.is_gpt2:  # absolute positions: transformers' GPT-2 numbers them from the first column
            print("warning: a GPT-2 reward model's export left-pads; transformers' GPT-2 numbers positions from the "
                  "first column whatever the mask, so pass position_ids=attention_mask.cumsum(-1) - 1 (clipped at "
                  "0) with batches", file=sys.stderr)
    if not (out_dir / "generation_config.json").exists():
        generation = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
