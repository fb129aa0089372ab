"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> params. No torch, no code execution.

The tables below are explicit so that every transpose and reshape is visible next to its HF name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.errors import UserError, os_reason
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.runtime import fsio

# (family, head) for each supported HF architecture.
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "scalar"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "scalar"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
}
_ARCH_NAMES = {("gpt2", "lm"): "GPT2LMHeadModel", ("gpt2", "scalar"): "GPT2ForSequenceClassification",
               ("llama", "lm"): "LlamaForCausalLM", ("llama", "scalar"): "LlamaForSequenceClassification",
               ("qwen2", "lm"): "Qwen2ForCausalLM", ("qwen2", "scalar"): "Qwen2ForSequenceClassification"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   "added_tokens.json")


class HFFormatError(UserError):
    """A checkpoint directory that cannot be read as a supported HF model."""


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HFFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise HFFormatError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as e:
        raise HFFormatError(f"{path}: cannot read ({os_reason(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path}: invalid JSON ({e})") from None


def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def _rope_fields(hf: dict) -> dict:
    """Both layouts: transformers 5 `rope_parameters`, and top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise HFFormatError(f"rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type != "default":
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_max_position=int(merged["original_max_position_embeddings"]))
    return out


def config_from_hf(hf: dict, generation: dict | None = None, where: str = "config.json") -> tuple[ModelConfig, str]:
    """(ModelConfig, head) from a parsed config.json (and generation_config.json, whose EOS ids win)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and archs:
        raise HFFormatError(f"{where}: architecture {archs[0]!r} is not supported; supported: {_supported()}")
    family, head = ARCHITECTURES[arch] if arch else (model_type, "lm")
    if family not in ("gpt2", "llama", "qwen2"):
        raise HFFormatError(f"{where}: model_type {model_type!r} is not supported; supported: {_supported()}")
    generation = generation or {}
    eos = _as_tuple(generation.get("eos_token_id", hf.get("eos_token_id")))
    pad = generation.get("pad_token_id", hf.get("pad_token_id"))
    pad = _as_tuple(pad)[0] if _as_tuple(pad) else None
    common = dict(family=family, vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                  eos_token_ids=eos, pad_token_id=pad)
    try:
        if family == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise HFFormatError(f"{where}: GPT-2 activation {hf['activation_function']!r} is not supported")
            if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
                raise HFFormatError(f"{where}: only standard GPT-2 attention scaling is supported")
            d = hf["n_embd"]
            cfg = ModelConfig(**common, d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                              n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                              max_position_embeddings=hf["n_positions"],
                              norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                              tie_embeddings=hf.get("tie_word_embeddings", True))
        else:
            if hf.get("hidden_act", "silu") != "silu":
                raise HFFormatError(f"{where}: activation {hf['hidden_act']!r} is not supported (expected silu)")
            if hf.get("use_sliding_window"):
                raise HFFormatError(f"{where}: sliding-window attention is not supported")
            n_heads = hf["num_attention_heads"]
            cfg = ModelConfig(**common, d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                              n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                              head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                              d_ff=hf["intermediate_size"],
                              max_position_embeddings=hf.get("max_position_embeddings", 2048),
                              norm_eps=hf.get("rms_norm_eps", 1e-6),
                              qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
                              mlp_bias=bool(hf.get("mlp_bias", False)),
                              tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_fields(hf))
    except KeyError as e:
        raise HFFormatError(f"{where}: missing key {e.args[0]!r} for a {family} model") from None
    return cfg, head


def config_to_hf(cfg: ModelConfig, head: str = "lm") -> dict:
    """A config.json dict that transformers loads as the matching architecture."""
    out = dict(architectures=[_ARCH_NAMES[(cfg.family, head)]], model_type=cfg.family, vocab_size=cfg.vocab_size,
               bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
               eos_token_id=(list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]),
               tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32")
    if head == "scalar":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if cfg.is_gpt2:
        out.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                   n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
                   activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return out
    rope = dict(rope_type=cfg.rope_type, rope_theta=cfg.rope_theta)
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    out.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
               hidden_act="silu", rope_parameters=rope, rope_theta=cfg.rope_theta,
               rope_scaling=None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
               attention_dropout=0.0)
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


# ---------------------------------------------------------------------------------------------- weights


def _prefix(cfg: ModelConfig) -> str:
    return "transformer." if cfg.is_gpt2 else "model."


def params_to_hf(params: dict, cfg: ModelConfig, head: str = "lm") -> dict[str, np.ndarray]:
    """Our param tree -> HF state dict (numpy), with HF's names, layouts and transposes."""
    p = {k: v for k, v in params.items()}
    K, G, H, D = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_model
    pre = _prefix(cfg)
    a = lambda x: np.asarray(x)
    out: dict[str, np.ndarray] = {}
    if cfg.is_gpt2:
        out[pre + "wte.weight"] = a(p["embed"])
        out[pre + "wpe.weight"] = a(p["pos_embed"])
    else:
        out[pre + "embed_tokens.weight"] = a(p["embed"])
    for i in range(cfg.n_layers):
        layer = p[f"layer_{i}"]
        attn, mlp = layer["attn"], layer["mlp"]
        qkv = a(attn["qkv"])  # (D, K, G+2, H)
        q_DN, k_DK, v_DK = (qkv[:, :, :G].reshape(D, K * G * H), qkv[:, :, G].reshape(D, K * H),
                            qkv[:, :, G + 1].reshape(D, K * H))
        w_o = a(attn["o"]).reshape(K * G * H, D)
        wi, wo = a(mlp["wi"]), a(mlp["wo"])
        if cfg.is_gpt2:
            lp = f"{pre}h.{i}."
            out[lp + "ln_1.weight"] = a(layer["attn_norm"]["scale"])
            out[lp + "ln_1.bias"] = a(layer["attn_norm"]["bias"])
            out[lp + "ln_2.weight"] = a(layer["mlp_norm"]["scale"])
            out[lp + "ln_2.bias"] = a(layer["mlp_norm"]["bias"])
            out[lp + "attn.c_attn.weight"] = np.concatenate([q_DN, k_DK, v_DK], axis=1)  # Conv1D: (in, out)
            b = a(attn["qkv_bias"])
            out[lp + "attn.c_attn.bias"] = np.concatenate(
                [b[:, :G].reshape(-1), b[:, G].reshape(-1), b[:, G + 1].reshape(-1)])
            out[lp + "attn.c_proj.weight"] = w_o
            out[lp + "attn.c_proj.bias"] = a(attn["o_bias"])
            out[lp + "mlp.c_fc.weight"] = wi[:, 0]
            out[lp + "mlp.c_fc.bias"] = a(mlp["wi_bias"])[0]
            out[lp + "mlp.c_proj.weight"] = wo
            out[lp + "mlp.c_proj.bias"] = a(mlp["wo_bias"])
        else:
            lp = f"{pre}layers.{i}."
            out[lp + "input_layernorm.weight"] = a(layer["attn_norm"]["scale"])
            out[lp + "post_attention_layernorm.weight"] = a(layer["mlp_norm"]["scale"])
            out[lp + "self_attn.q_proj.weight"] = q_DN.T  # Linear: (out, in)
            out[lp + "self_attn.k_proj.weight"] = k_DK.T
            out[lp + "self_attn.v_proj.weight"] = v_DK.T
            out[lp + "self_attn.o_proj.weight"] = w_o.T
            if cfg.qkv_bias:
                b = a(attn["qkv_bias"])
                out[lp + "self_attn.q_proj.bias"] = b[:, :G].reshape(-1)
                out[lp + "self_attn.k_proj.bias"] = b[:, G].reshape(-1)
                out[lp + "self_attn.v_proj.bias"] = b[:, G + 1].reshape(-1)
            out[lp + "mlp.gate_proj.weight"] = wi[:, 0].T
            out[lp + "mlp.up_proj.weight"] = wi[:, 1].T
            out[lp + "mlp.down_proj.weight"] = wo.T
            if cfg.mlp_bias:
                out[lp + "mlp.gate_proj.bias"] = a(mlp["wi_bias"])[0]
                out[lp + "mlp.up_proj.bias"] = a(mlp["wi_bias"])[1]
                out[lp + "mlp.down_proj.bias"] = a(mlp["wo_bias"])
    norm = p["final_norm"]
    out[pre + ("ln_f.weight" if cfg.is_gpt2 else "norm.weight")] = a(norm["scale"])
    if cfg.is_gpt2:
        out[pre + "ln_f.bias"] = a(norm["bias"])
    if head == "scalar":
        out["score.weight"] = a(p["score"]).T
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = a(p["lm_head"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, head: str = "lm") -> dict:
    """HF state dict (numpy) -> our param tree; every expected tensor must be present with its exact shape."""
    pre = _prefix(cfg)
    if cfg.is_gpt2 and not any(k.startswith(pre) for k in tensors):  # original GPT-2 files have no prefix
        tensors = {(k if k.startswith(("lm_head.", "score.")) else pre + k): v for k, v in tensors.items()}
    K, G, H, D, F = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_model, cfg.d_ff
    N = K * G

    def get(name, shape):
        if name not in tensors:
            raise HFFormatError(f"weights: tensor {name!r} is missing")
        t = np.asarray(tensors[name])
        if t.shape != tuple(shape):
            raise HFFormatError(f"weights: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")
        return t

    def qkv_from(q_DN, k_DK, v_DK):  # -> (D, K, G+2, H), query heads grouped under their KV head
        return np.concatenate([q_DN.reshape(D, K, G, H), k_DK.reshape(D, K, 1, H), v_DK.reshape(D, K, 1, H)], 2)

    def qkv_bias_from(q, k, v):
        return np.concatenate([q.reshape(K, G, H), k.reshape(K, 1, H), v.reshape(K, 1, H)], 1)

    p: dict = {}
    if cfg.is_gpt2:
        p["embed"] = get(pre + "wte.weight", (cfg.vocab_size, D))
        p["pos_embed"] = get(pre + "wpe.weight", (cfg.max_position_embeddings, D))
    else:
        p["embed"] = get(pre + "embed_tokens.weight", (cfg.vocab_size, D))
    for i in range(cfg.n_layers):
        if cfg.is_gpt2:
            lp = f"{pre}h.{i}."
            c_attn = get(lp + "attn.c_attn.weight", (D, 3 * D))
            c_bias = get(lp + "attn.c_attn.bias", (3 * D,))
            layer = {
                "attn_norm": {"scale": get(lp + "ln_1.weight", (D,)), "bias": get(lp + "ln_1.bias", (D,))},
                "mlp_norm": {"scale": get(lp + "ln_2.weight", (D,)), "bias": get(lp + "ln_2.bias", (D,))},
                "attn": {"qkv": qkv_from(*np.split(c_attn, 3, axis=1)),
                         "qkv_bias": qkv_bias_from(*np.split(c_bias, 3)),
                         "o": get(lp + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
                         "o_bias": get(lp + "attn.c_proj.bias", (D,))},
                "mlp": {"wi": get(lp + "mlp.c_fc.weight", (D, F))[:, None],
                        "wi_bias": get(lp + "mlp.c_fc.bias", (F,))[None],
                        "wo": get(lp + "mlp.c_proj.weight", (F, D)),
                        "wo_bias": get(lp + "mlp.c_proj.bias", (D,))},
            }
        else:
            lp = f"{pre}layers.{i}."
            sa = lp + "self_attn."
            attn = {"qkv": qkv_from(get(sa + "q_proj.weight", (N * H, D)).T, get(sa + "k_proj.weight", (K * H, D)).T,
                                    get(sa + "v_proj.weight", (K * H, D)).T),
                    "o": get(sa + "o_proj.weight", (D, N * H)).T.reshape(N, H, D)}
            if cfg.qkv_bias:
                attn["qkv_bias"] = qkv_bias_from(get(sa + "q_proj.bias", (N * H,)), get(sa + "k_proj.bias", (K * H,)),
                                                 get(sa + "v_proj.bias", (K * H,)))
            mlp = {"wi": np.stack([get(lp + "mlp.gate_proj.weight", (F, D)).T,
                                   get(lp + "mlp.up_proj.weight", (F, D)).T], axis=1),
                   "wo": get(lp + "mlp.down_proj.weight", (D, F)).T}
            if cfg.mlp_bias:
                mlp["wi_bias"] = np.stack([get(lp + "mlp.gate_proj.bias", (F,)), get(lp + "mlp.up_proj.bias", (F,))])
                mlp["wo_bias"] = get(lp + "mlp.down_proj.bias", (D,))
            layer = {"attn_norm": {"scale": get(lp + "input_layernorm.weight", (D,))},
                     "mlp_norm": {"scale": get(lp + "post_attention_layernorm.weight", (D,))},
                     "attn": attn, "mlp": mlp}
        p[f"layer_{i}"] = layer
    if cfg.is_gpt2:
        p["final_norm"] = {"scale": get(pre + "ln_f.weight", (D,)), "bias": get(pre + "ln_f.bias", (D,))}
    else:
        p["final_norm"] = {"scale": get(pre + "norm.weight", (D,))}
    if head == "scalar":
        p["score"] = get("score.weight", (1, D)).T
    elif not cfg.tie_embeddings:
        p["lm_head"] = get("lm_head.weight", (cfg.vocab_size, D)).T
    return _contiguous(p)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)


# ---------------------------------------------------------------------------------------------- directories


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
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise HFFormatError(f"{path}: corrupt or truncated safetensors file ({os_reason(e)})") from None
    except OSError as e:
        raise HFFormatError(f"{path}: cannot read ({os_reason(e)})") from None


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
    gen_path = model_dir / "generation_config.json"
    generation = read_json(gen_path) if gen_path.exists() else None
    cfg, hf_head = config_from_hf(read_json(model_dir / "config.json"), generation, str(model_dir / "config.json"))
    head = head or hf_head
    return cfg, head, params_from_hf(read_tensors(model_dir), cfg, head)


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
    eos_ids = set(cfg.eos_token_ids) | {tok_eos}  # training appends the tokenizer's EOS to every response
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


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors: make them one
        raise OSError(f"{path.name}: {os_reason(e)}") from None


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
        _save_safetensors(shards[0], out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_safetensors(shard, out_dir / fname)
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
    if not (out_dir / "generation_config.json").exists():
        generation = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))


def model_config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ()))})
