"""Hugging Face config.json <-> ModelConfig for the supported architectures (GPT-2, Llama, Qwen2; language-model
and sequence-classification heads), with the reading of a checkpoint's JSON files and the `HFFormatError` for a
directory that is not a supported HF model. No torch, no code execution.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_jax.errors import UserError, os_reason
from rlhf_jax.models.transformer import ModelConfig

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
