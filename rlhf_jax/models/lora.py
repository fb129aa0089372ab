"""LoRA (Hu et al. 2021): a rank-R update W + (alpha / R) * A @ B of each targeted projection, on the fused layout of
`rlhf_jax.models.transformer` (q/k/v inside `qkv`, gate/up inside `wi`): which params train and which stay frozen,
the merge into plain params, and the PEFT adapter layout (adapter_config.json + adapter_model.safetensors) that
loads on the HF base model.

An adapter is {"a_IR": (I, R), "b_RO": (R, O)} for a matrix that maps I inputs to O outputs (x_BTI @ W_IO): `b`
starts at zero, so a fresh adapter leaves the model exactly as it was. A model with a `LoraSpec` holds each
target's adapter beside the matrix, as `<target>_lora` under its layer's `attn` or `mlp`, and adds
x @ A @ B * alpha / R to the projection's output (`layers.LoraDelta`); `adapters` gathers them as
{"layer_<i>": {target: adapter}}. PEFT stores the transposes (lora_A.weight (R, I), lora_B.weight (O, R)) with the
same scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rlhf_jax.config import LORA_ALSO_TRAIN, LORA_TARGETS
from rlhf_jax.errors import UserError
from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.layer_stack import unstack_layers
from rlhf_jax.runtime import fsio

TARGETS = LORA_TARGETS  # the config's names: q, k, v, o, gate, up, down
# The HF module each target adapts, under model.layers.<i>.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0  # on each adapter's input, in training steps only
    also_train: tuple[str, ...] = ()  # whole weights that train too: norms, embed, lm_head


    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"lora.rank must be at least 1, got {self.rank}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"lora.targets must be a non-empty list of {', '.join(TARGETS)}; got {list(self.targets)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if any(m not in LORA_ALSO_TRAIN for m in self.also_train):
            raise UserError(f"lora.also_train entries must be among {', '.join(LORA_ALSO_TRAIN)}; got "
                            f"{list(self.also_train)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_family(cfg: ModelConfig) -> None:
    if cfg.is_gpt2:  # its fused c_attn has no separate q/k/v modules for an adapter to name
        raise UserError("LoRA is supported for the Llama-style families (llama, qwen2, qwen3, mistral, gemma2, "
                        "gemma3), not gpt2")


def matrix_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(I, O) of the projection a target adapts, as HF's Linear(I, O) has it."""
    D, F, N, KH = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (D, N), "k": (D, KH), "v": (D, KH), "o": (N, D), "gate": (D, F), "up": (D, F), "down": (F, D)}[target]


def init_adapters(cfg: ModelConfig, spec: LoraSpec, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh adapters {"layer_<i>": {target: {"a_IR", "b_RO"}}}: A uniform in +-1/sqrt(I) (PEFT's default,
    Kaiming-uniform with a = sqrt(5)), B zero."""
    check_family(cfg)
    out = {}
    for i, layer_rng in enumerate(jax.random.split(rng, cfg.n_layers)):
        layer = {}
        for target, key in zip(spec.targets, jax.random.split(layer_rng, len(spec.targets))):
            I, O = matrix_shape(cfg, target)
            bound = 1.0 / math.sqrt(I)
            layer[target] = {"a_IR": jax.random.uniform(key, (I, spec.rank), dtype, -bound, bound),
                             "b_RO": jnp.zeros((spec.rank, O), dtype)}
        out[f"layer_{i}"] = layer
    return out


def module_of(target: str) -> str:
    """The block submodule whose projection a target adapts."""
    return "attn" if target in ("q", "k", "v", "o") else "mlp"


def _is_adapter(path: tuple[str, ...]) -> bool:
    return any(key.endswith("_lora") for key in path)


def _is_also_trained(path: tuple[str, ...], also_train: tuple[str, ...]) -> bool:
    """A whole weight that `also_train` names: every norm's scale, the embedding, the LM head."""
    return (("norms" in also_train and any(key.endswith("norm") for key in path[:-1]))
            or (path[0] in also_train and path[0] in ("embed", "lm_head")))


def _select(params: dict, keep) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep(k)})


def split(params: dict, spec: LoraSpec) -> tuple[dict, dict]:
    """(trainable, frozen) of a LoRA model's params: the adapters, a scalar head and what `spec.also_train`
    names train, the rest of the base stays frozen. Works on boxed trees (logical axis names) too."""
    trains = lambda path: path == ("score",) or _is_adapter(path) or _is_also_trained(path, spec.also_train)
    return _select(params, trains), _select(params, lambda path: not trains(path))


def also_trained(params: dict, spec: LoraSpec) -> dict:
    """The weights of `params` that `spec.also_train` names ({} without any): with the frozen base, the model
    before training, which is a LoRA policy's reference."""
    return _select(params, lambda path: _is_also_trained(path, spec.also_train))


def without_adapters(params: dict) -> dict:
    """`params` with every adapter's subtree dropped."""
    return _select(params, lambda path: not _is_adapter(path))


def join(trainable: dict, frozen: dict) -> dict:
    """The whole params of `split`'s two parts; only dicts are rebuilt, no array is copied."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def adapters(params: dict) -> dict:
    """{"layer_<i>": {target: {"a_IR", "b_RO"}}} of a LoRA model's params (its trainable part or the whole, in
    either layer layout)."""
    params = unstack_layers(_select(params, _is_adapter))
    return {name: {key[:-len("_lora")]: ab for sub in ("attn", "mlp") for key, ab in layer.get(sub, {}).items()
                   if key.endswith("_lora")}
            for name, layer in params.items() if name.startswith("layer_")}


def with_adapters(params: dict, adapters_by_layer: dict) -> dict:
    """`params` (a LoRA model's base) holding `adapters_by_layer` ({"layer_<i>": {target: adapter}}) in place."""
    flat = {(name, module_of(t), f"{t}_lora"): ab for name, layer in adapters_by_layer.items() for t, ab in layer.items()}
    return join(traverse_util.unflatten_dict(flat), params)


def merged(params: dict, cfg: ModelConfig, spec: LoraSpec) -> dict:
    """A LoRA model's whole params as plain params (adapters merged, their subtrees gone) in the per-layer layout:
    what `export/` holds."""
    return merge(unstack_layers(without_adapters(params)), adapters(params), cfg, spec)


def _add_delta(layer: dict, target: str, delta_IO: jax.Array, cfg: ModelConfig) -> dict:
    """`layer` with delta_IO added to the slice of the fused tensor that holds the target's HF matrix."""
    attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
    K, G, H, D = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_model
    add = lambda w, where, d: jnp.asarray(w).at[where].add(d.astype(w.dtype))
    if target == "q":  # qkv_DKCH: per KV head, its G query heads, then k, then v (HF's q row (k * G + g) * H + h)
        attn["qkv"] = add(attn["qkv"], np.s_[:, :, :G], delta_IO.reshape(D, K, G, H))
    elif target in ("k", "v"):
        attn["qkv"] = add(attn["qkv"], np.s_[:, :, G + (target == "v")], delta_IO.reshape(D, K, H))
    elif target == "o":
        attn["o"] = add(attn["o"], np.s_[...], delta_IO.reshape(K * G, H, D))
    elif target in ("gate", "up"):  # wi_DCF stacks gate (0) and up (1)
        mlp["wi"] = add(mlp["wi"], np.s_[:, int(target == "up")], delta_IO)
    else:
        mlp["wo"] = add(mlp["wo"], np.s_[...], delta_IO)
    return {**layer, "attn": attn, "mlp": mlp}


def merge(params: dict, adapters: dict, cfg: ModelConfig, spec: LoraSpec) -> dict:
    """The params with every adapter's (alpha / R) * A @ B added (float32 product, rounded once to the params'
    dtype). Traceable: a training step merges inside its program."""
    out = dict(params)
    for layer_name, layer_adapters in adapters.items():
        layer = out[layer_name]
        for target, ab in layer_adapters.items():
            a = jnp.asarray(ab["a_IR"], jnp.float32)
            b = jnp.asarray(ab["b_RO"], jnp.float32)
            layer = _add_delta(layer, target, spec.scale * (a @ b), cfg)
        out[layer_name] = layer
    return out


def peft_tensors(adapters: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors names and layouts: lora_A.weight (R, I), lora_B.weight (O, R)."""
    out = {}
    for i in range(cfg.n_layers):
        for target, ab in adapters.get(f"layer_{i}", {}).items():
            name = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a_IR"], np.float32).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b_RO"], np.float32).T)
    return out


# PEFT's modules_to_save entry of each also_train name (it matches module names by suffix: "norm" is every norm).
PEFT_MODULES_TO_SAVE = {"norms": "norm", "embed": "embed_tokens", "lm_head": "lm_head"}


def peft_config(spec: LoraSpec, base_model: str, scalar_head: bool = False, head_saved: bool = False,
                tied: bool = False) -> dict:
    """adapter_config.json that `peft.PeftModel.from_pretrained` reads: a causal-LM adapter, or with `scalar_head`
    a sequence-classification one (a reward or value model) whose `score` head is saved whole; `head_saved`: the
    LM head is saved whole too (trained, or a `tied` model's, beside its trained embedding: PEFT keeps the two
    tied)."""
    names = [m for m in spec.also_train if not (scalar_head and m == "lm_head")]
    names += ["lm_head"] if head_saved and "lm_head" not in names else []
    saved = [PEFT_MODULES_TO_SAVE[m] for m in names] + (["score"] if scalar_head else [])
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if scalar_head else "CAUSAL_LM",
            "base_model_name_or_path": base_model, "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in spec.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": saved or None, **({"ensure_weight_tying": True} if head_saved and tied else {})}


def write_adapter(out_dir: str | os.PathLike, adapters: dict, cfg: ModelConfig, spec: LoraSpec,
                  base_model: str, saved_modules: dict[str, np.ndarray] | None = None) -> None:
    """The PEFT files of `adapters` into the existing empty directory `out_dir` (inside fsio.replace_dir);
    `saved_modules`: the weights trained whole under their HF names (PEFT's modules_to_save); a `score.weight`
    among them makes it a sequence-classification adapter."""
    out_dir = Path(out_dir)
    tensors = {**peft_tensors(adapters, cfg),
               **{f"base_model.model.{name}": np.ascontiguousarray(x) for name, x in (saved_modules or {}).items()}}
    fsio.save_safetensors(tensors, out_dir / ADAPTER_WEIGHTS)
    config = peft_config(spec, base_model, scalar_head="score.weight" in (saved_modules or {}),
                         head_saved="lm_head.weight" in (saved_modules or {}), tied=cfg.tie_embeddings)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
