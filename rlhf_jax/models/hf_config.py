"""Hugging Face config.json <-> ModelConfig for the supported architectures (GPT-2, Llama, Qwen2, Qwen3, Mistral,
Gemma 2, Gemma 3 text; language-model and sequence-classification heads), with the reading of a checkpoint's JSON
files and the `HFFormatError` for a directory that is not a supported HF model. No torch, no code execution.
Keys a config.json leaves out take the defaults of transformers' config class for the newer families.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_jax.errors import UserError, os_reason
from rlhf_jax.models.architecture import FULL, SLIDING, ModelConfig

# (family, head) for each supported HF architecture.
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "scalar"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "scalar"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
    "Qwen3ForCausalLM": ("qwen3", "lm"),
    "Qwen3ForSequenceClassification": ("qwen3", "scalar"),
    "MistralForCausalLM": ("mistral", "lm"),
    "MistralForSequenceClassification": ("mistral", "scalar"),
    "Gemma2ForCausalLM": ("gemma2", "lm"),
    "Gemma2ForSequenceClassification": ("gemma2", "scalar"),
    "Gemma3ForCausalLM": ("gemma3", "lm"),
    "Gemma3TextForSequenceClassification": ("gemma3", "scalar"),
}
_ARCH_NAMES = {family_head: arch for arch, family_head in ARCHITECTURES.items()}
# config.json's model_type of each family (Gemma 3's text-only model is "gemma3_text").
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
               "gemma2": "gemma2", "gemma3": "gemma3_text"}
_FAMILY_OF_TYPE = {model_type: family for family, model_type in MODEL_TYPES.items()}
# Defaults for keys a config.json may leave out: transformers' own for each family (tests/test_families.py compares
# them with its config classes); our exports write every key.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen3": dict(max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0, head_dim=128,
                  sliding_window=4096, max_window_layers=28),
    "mistral": dict(max_position_embeddings=4096 * 32, tie_word_embeddings=False, rope_theta=10000.0,
                    sliding_window=4096),
    "gemma2": dict(max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=10000.0, head_dim=256,
                   sliding_window=4096, query_pre_attn_scalar=256, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3": dict(max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=1_000_000.0, head_dim=256,
                   sliding_window=4096, query_pre_attn_scalar=256, final_logit_softcapping=None,
                   rope_local_base_freq=10000.0, sliding_window_pattern=6),
}


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


def _rope_fields(hf: dict, where: str, default_theta: float = 10000.0) -> dict:
    """Both layouts: transformers 5 `rope_parameters`, and top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if FULL in params or SLIDING in params:  # per layer type (Gemma 3): the global layers' rope here
        params = dict(params.get(FULL) or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    if scaling and params:  # transformers would read one and drop the other: they must say the same
        kind = lambda d: d.get("rope_type", d.get("type", "default"))
        clash = [k for k in sorted(set(scaling) & set(params) - {"type", "rope_type"}) if scaling[k] != params[k]]
        clash += ["rope_type"] * (kind(scaling) != kind(params))
        clash += ["rope_theta"] * ("rope_theta" in params and params["rope_theta"] != hf.get("rope_theta", theta))
        if clash:
            raise HFFormatError(f"{where}: rope_scaling and rope_parameters disagree ({', '.join(clash)}); keep one")
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise HFFormatError(f"{where}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type != "default":
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_max_position=int(merged["original_max_position_embeddings"]))
    return out


def _local_rope_theta(hf: dict, where: str) -> float:
    """Gemma 3's sliding layers' RoPE base: rope_parameters["sliding_attention"] or rope_local_base_freq."""
    local = (hf.get("rope_parameters") or {}).get(SLIDING) or {}
    rope_type = local.get("rope_type", local.get("type", "default"))
    if rope_type != "default":
        raise HFFormatError(f"{where}: sliding layers' rope type {rope_type!r} is not supported; supported: default")
    return float(local.get("rope_theta", hf.get("rope_local_base_freq", _DEFAULTS["gemma3"]["rope_local_base_freq"])))


def _get(hf: dict, family: str, key: str):
    """A config.json value, or transformers' default for the family when the key is absent (null stays None)."""
    return hf[key] if key in hf else _DEFAULTS[family][key]


def _layer_types(hf: dict, family: str, n_layers: int, window: int | None, where: str) -> tuple[str, ...]:
    """Which layers slide, as transformers derives it: config.json's `layer_types`, else Gemma 2's even layers,
    Gemma 3's `sliding_window_pattern` (every pattern-th layer is global) or Qwen3's layers from
    `max_window_layers` on. () without a window (every layer is global) and for Mistral (every layer slides)."""
    if window is None or family == "mistral":
        return ()
    types = hf.get("layer_types")
    if types is None:
        if family == "gemma2":
            types = [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
        elif family == "gemma3":
            pattern = int(_get(hf, family, "sliding_window_pattern"))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        else:  # qwen3
            first = int(_get(hf, family, "max_window_layers"))
            types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {SLIDING, FULL}:
        raise HFFormatError(f"{where}: layer_types must list {n_layers} entries, each {SLIDING!r} or {FULL!r}")
    return tuple(types)


def _gpt2_config(hf: dict, common: dict, where: str) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFFormatError(f"{where}: GPT-2 activation {hf['activation_function']!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise HFFormatError(f"{where}: only standard GPT-2 attention scaling is supported")
    d = hf["n_embd"]
    return ModelConfig(**common, d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                       head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                       max_position_embeddings=hf["n_positions"], norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _decoder_config(hf: dict, family: str, common: dict, where: str) -> ModelConfig:
    """Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 text."""
    gemma = family in ("gemma2", "gemma3")
    act_key = "hidden_activation" if gemma else "hidden_act"
    expected = "gelu_pytorch_tanh" if gemma else "silu"
    defaults = _DEFAULTS[family]
    problems = []  # every setting the model does not implement, named in one line
    if hf.get(act_key, expected) != expected:
        problems.append(f"{act_key} {hf[act_key]!r} is not supported (expected {expected})")
    if family == "qwen2" and hf.get("use_sliding_window"):
        problems.append("sliding-window attention is not supported for qwen2")
    if family in ("llama", "qwen3", "gemma2", "gemma3") and hf.get("attention_bias"):  # o_proj would have one too
        problems.append(f"attention_bias: true is not supported for {family}")
    if gemma and hf.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention: true is not supported (a decoder is causal)")
    try:
        rope = _rope_fields(hf, where, defaults["rope_theta"])
    except HFFormatError as e:
        problems.append(str(e).removeprefix(f"{where}: "))
    if problems:
        raise HFFormatError(f"{where}: " + "; ".join(problems))
    n_heads, n_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    window = None
    if family in ("qwen3", "mistral", "gemma2", "gemma3"):
        window = _get(hf, family, "sliding_window")
        if family == "qwen3" and not hf.get("use_sliding_window", False):
            window = None  # as Qwen3Config: the window holds only with use_sliding_window
    extra = {}
    if gemma:
        extra = dict(query_pre_attn_scalar=float(_get(hf, family, "query_pre_attn_scalar")),
                     final_softcap=_get(hf, family, "final_logit_softcapping"),
                     # transformers' Gemma 3 attention ignores attn_logit_softcapping: so do we
                     attn_softcap=_get(hf, family, "attn_logit_softcapping") if family == "gemma2" else None)
        extra = {k: (float(v) if v is not None else None) for k, v in extra.items()}
    if family == "gemma3":
        flat = hf.get("rope_parameters") and not {FULL, SLIDING} & set(hf["rope_parameters"])
        if flat:  # transformers' Gemma 3 config replaces a flat one by its defaults per layer type
            raise HFFormatError(f"{where}: Gemma 3's rope_parameters must be given per layer type ({FULL!r}, "
                                f"{SLIDING!r}), as transformers writes them; a flat one is not read by transformers")
        extra["rope_local_theta"] = _local_rope_theta(hf, where)
    return ModelConfig(**common, d_model=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                       head_dim=hf.get("head_dim") or defaults.get("head_dim") or hf["hidden_size"] // n_heads,
                       d_ff=hf["intermediate_size"],
                       max_position_embeddings=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                       qkv_bias=family == "qwen2",
                       mlp_bias=family in ("llama", "qwen2") and bool(hf.get("mlp_bias", False)),
                       tie_embeddings=hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
                       sliding_window=None if window is None else int(window),
                       layer_types=_layer_types(hf, family, n_layers, window, where),
                       **rope, **extra)


def config_from_hf(hf: dict, generation: dict | None = None, where: str = "config.json") -> tuple[ModelConfig, str]:
    """(ModelConfig, head) from a parsed config.json (and generation_config.json, whose EOS ids win)."""
    if not isinstance(hf, dict):
        raise HFFormatError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise HFFormatError(f"{where}: 'architectures' expects a list of class names, got {archs!r}")
    model_type = hf.get("model_type")
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and archs:
        raise HFFormatError(f"{where}: architecture {archs[0]!r} is not supported; supported: {_supported()}")
    family, head = ARCHITECTURES[arch] if arch else (_FAMILY_OF_TYPE.get(model_type), "lm")
    if family is None:
        raise HFFormatError(f"{where}: model_type {model_type!r} is not supported; supported: {_supported()}")
    if _FAMILY_OF_TYPE.get(model_type, family) != family:  # transformers builds the model by its model_type
        raise HFFormatError(f"{where}: architectures names {arch!r} ({family}) but model_type is {model_type!r} "
                            f"({_FAMILY_OF_TYPE[model_type]}); one of them is wrong")
    if quantized := hf.get("quantization_config"):  # its weights are scaled integers or floats of 8 bits or fewer
        method = quantized.get("quant_method") if isinstance(quantized, dict) else None
        raise HFFormatError(f"{where}: quantization_config{f' (quant_method {method!r})' if method else ''}: "
                            "quantized checkpoints are not loaded; use the model's unquantized (bfloat16 or float32) "
                            "release")
    generation = generation or {}
    if not isinstance(generation, dict):
        raise HFFormatError(f"generation_config.json beside {where}: expected a JSON object")
    try:
        _check_sizes(hf, where)
        eos = _as_tuple(generation.get("eos_token_id", hf.get("eos_token_id")))
        pad = generation.get("pad_token_id", hf.get("pad_token_id"))
        pad = _as_tuple(pad)[0] if _as_tuple(pad) else None
        if outside := [i for i in eos if not 0 <= i < hf["vocab_size"]]:  # sampling would never stop on it
            raise HFFormatError(f"{where}: eos_token_id {outside[0]} is outside the vocabulary of {hf['vocab_size']} "
                                "tokens (generation_config.json's wins when it has one)")
        common = dict(family=family, vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                      eos_token_ids=eos, pad_token_id=pad)
        if family == "gpt2":
            return _gpt2_config(hf, common, where), head
        return _decoder_config(hf, family, common, where), head
    except KeyError as e:
        raise HFFormatError(f"{where}: missing key {e.args[0]!r} for a {family} model") from None
    except HFFormatError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # ModelConfig's checks, a wrong type
        raise HFFormatError(f"{where}: invalid value for a {family} model ({e})") from None


# Sizes and counts of either layout; each is a positive integer where given (null: the family's default).
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "head_dim", "max_position_embeddings", "sliding_window_pattern",
             "n_embd", "n_layer", "n_head", "n_inner", "n_positions")


def _check_sizes(hf: dict, where: str) -> None:
    for key in SIZE_KEYS:
        value = hf.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise HFFormatError(f"{where}: {key} must be a positive integer, got {value!r}")


def _number(x: float | None):
    """An integral float as an int (transformers types query_pre_attn_scalar as int)."""
    return int(x) if x is not None and float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig, head: str = "lm") -> dict:
    """A config.json dict that transformers loads as the matching architecture."""
    out = dict(architectures=[_ARCH_NAMES[(cfg.family, head)]], model_type=MODEL_TYPES[cfg.family],
               vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
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
    if cfg.family in ("qwen3", "mistral", "gemma2", "gemma3"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen3", "gemma2", "gemma3"):
        out.update(attention_bias=False,
                   layer_types=[SLIDING if cfg.is_sliding(i) else FULL for i in range(cfg.n_layers)])
    if cfg.family == "qwen3":
        out.update(use_sliding_window=cfg.sliding_window is not None, max_window_layers=cfg.n_layers)
    if cfg.is_gemma:
        del out["hidden_act"]
        scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar  # None: 1/sqrt(H)
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_number(scalar),
                   final_logit_softcapping=cfg.final_softcap, attn_logit_softcapping=cfg.attn_softcap)
    if cfg.family == "gemma3":  # rope per layer type; rope_local_base_freq for older readers
        local = dict(rope_type="default", rope_theta=cfg.rope_local_theta)
        out.update(rope_parameters={FULL: rope, SLIDING: local}, rope_local_base_freq=cfg.rope_local_theta)
    return out
