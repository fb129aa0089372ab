"""Hugging Face safetensors tensors <-> rlhf_jax params, for every supported family: every tensor's HF name,
transpose and reshape, in explicit tables so that each is visible next to its HF name.
"""

from __future__ import annotations

import re

import numpy as np

from rlhf_jax.models.hf_config import HFFormatError
from rlhf_jax.models.layer_stack import unstack_layers
from rlhf_jax.models.transformer import ModelConfig


def _prefix(cfg: ModelConfig) -> str:
    return "transformer." if cfg.is_gpt2 else "model."


def _layer_norms(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(HF name, our name) of a decoder layer's norms. Llama's post_attention_layernorm is the MLP's input norm;
    Gemma's normalises the attention output, and pre_feedforward_layernorm is the MLP's input norm."""
    if cfg.is_gemma:
        return [("input_layernorm.weight", "attn_norm"), ("post_attention_layernorm.weight", "post_attn_norm"),
                ("pre_feedforward_layernorm.weight", "mlp_norm"),
                ("post_feedforward_layernorm.weight", "post_mlp_norm")]
    return [("input_layernorm.weight", "attn_norm"), ("post_attention_layernorm.weight", "mlp_norm")]


def params_to_hf(params: dict, cfg: ModelConfig, head: str = "lm") -> dict[str, np.ndarray]:
    """Our param tree, in either layer layout (a scanned model's params too) -> HF state dict (numpy), with HF's
    names, layouts and transposes."""
    p = unstack_layers(params)
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
            for hf_name, ours in _layer_norms(cfg):
                out[lp + hf_name] = a(layer[ours]["scale"])
            if cfg.qk_norm:
                out[lp + "self_attn.q_norm.weight"] = a(attn["q_norm"]["scale"])
                out[lp + "self_attn.k_norm.weight"] = a(attn["k_norm"]["scale"])
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


def whole_weights_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The embedding, LM head, scalar (`score`) head and norm scales that `params` (any part of a Llama-style tree)
    holds, under HF's names: the weights a LoRA model trains whole, which a PEFT adapter saves whole. A language
    model that ties its head to a saved embedding gets the head saved too: PEFT would give the trained embedding
    to the input alone."""
    pre, a = _prefix(cfg), np.asarray
    out: dict[str, np.ndarray] = {}
    if "embed" in params:
        out[pre + "embed_tokens.weight"] = a(params["embed"])
        if cfg.tie_embeddings and "score" not in params:
            out["lm_head.weight"] = a(params["embed"])
    if "lm_head" in params:
        out["lm_head.weight"] = a(params["lm_head"]).T
    if "score" in params:
        out["score.weight"] = a(params["score"]).T
    if "final_norm" in params:
        out[pre + "norm.weight"] = a(params["final_norm"]["scale"])
    for i in range(cfg.n_layers):
        layer = params.get(f"layer_{i}", {})
        for hf_name, ours in _layer_norms(cfg):
            if ours in layer:
                out[f"{pre}layers.{i}.{hf_name}"] = a(layer[ours]["scale"])
        for name in ("q_norm", "k_norm"):
            if name in layer.get("attn", {}):
                out[f"{pre}layers.{i}.self_attn.{name}.weight"] = a(layer["attn"][name]["scale"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# Buffers some files carry beside the weights: rotary frequencies, GPT-2's causal mask.
IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, head: str = "lm") -> dict:
    """HF state dict (numpy) -> our param tree; every expected tensor must be present with its exact shape."""
    pre = _prefix(cfg)
    if cfg.is_gpt2 and not any(k.startswith(pre) for k in tensors):  # original GPT-2 files have no prefix
        tensors = {(k if k.startswith(("lm_head.", "score.")) else pre + k): v for k, v in tensors.items()}
    K, G, H, D, F = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_model, cfg.d_ff
    N = K * G

    used: set[str] = set()

    def get(name, shape):
        if name not in tensors:
            raise HFFormatError(f"weights: tensor {name!r} is missing")
        used.add(name)
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
            if cfg.qk_norm:
                attn["q_norm"] = {"scale": get(sa + "q_norm.weight", (H,))}
                attn["k_norm"] = {"scale": get(sa + "k_norm.weight", (H,))}
            if cfg.qkv_bias:
                attn["qkv_bias"] = qkv_bias_from(get(sa + "q_proj.bias", (N * H,)), get(sa + "k_proj.bias", (K * H,)),
                                                 get(sa + "v_proj.bias", (K * H,)))
            mlp = {"wi": np.stack([get(lp + "mlp.gate_proj.weight", (F, D)).T,
                                   get(lp + "mlp.up_proj.weight", (F, D)).T], axis=1),
                   "wo": get(lp + "mlp.down_proj.weight", (D, F)).T}
            if cfg.mlp_bias:
                mlp["wi_bias"] = np.stack([get(lp + "mlp.gate_proj.bias", (F,)), get(lp + "mlp.up_proj.bias", (F,))])
                mlp["wo_bias"] = get(lp + "mlp.down_proj.bias", (D,))
            layer = {ours: {"scale": get(lp + hf_name, (D,))} for hf_name, ours in _layer_norms(cfg)}
            layer.update(attn=attn, mlp=mlp)
        p[f"layer_{i}"] = layer
    if cfg.is_gpt2:
        p["final_norm"] = {"scale": get(pre + "ln_f.weight", (D,)), "bias": get(pre + "ln_f.bias", (D,))}
    else:
        p["final_norm"] = {"scale": get(pre + "norm.weight", (D,))}
    if head == "scalar":
        p["score"] = get("score.weight", (1, D)).T
    elif not cfg.tie_embeddings:
        p["lm_head"] = get("lm_head.weight", (cfg.vocab_size, D)).T
    unused = sorted(name for name in tensors if name not in used and not name.endswith(IGNORED)
                    and not (name == "lm_head.weight" and cfg.tie_embeddings))
    beyond = sorted({int(m.group(1)) for name in unused if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", name))
                     and int(m.group(1)) >= cfg.n_layers})
    if beyond:  # the config counts fewer layers than the weights hold
        raise HFFormatError(f"weights: {beyond[-1] + 1} layers present, but config.json's "
                            f"{'n_layer' if cfg.is_gpt2 else 'num_hidden_layers'} is {cfg.n_layers}; one of them is "
                            "wrong")
    if unused:  # an architecture variant we do not model (a bias, a norm): importing it would change the model
        raise HFFormatError(f"weights: {len(unused)} tensor(s) a {cfg.family} model of this config does not have, "
                            f"e.g. {unused[0]!r}; this variant of the architecture is not supported")
    return _contiguous(p)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)
