"""The architecture of one decoder-only transformer family (GPT-2, Llama 2/3, Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3 text): which of its variations a model uses, as one frozen config."""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]
FAMILIES: tuple[str, ...] = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture; built from a HF config.json by `rlhf_jax.models.hf_config`, or directly for tests and the demo.

    The family fixes the structure (biases, norms, activation, q/k norms); the fields after `pad_token_id` are the
    newer families' numbers, and their defaults leave GPT-2, Llama and Qwen2 as they are."""

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling: 'default' | 'linear' | 'llama3' with its factors (HF semantics).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # A sliding layer's query at cache slot i sees the keys at slots j with i - j < sliding_window (HF's rule).
    # `layer_types` names each layer SLIDING or FULL; empty means every layer slides when a window is set (Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # sliding layers' RoPE base, default scaling (Gemma 3); None: as global
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (Gemma); None: H
    attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap before the mask (Gemma 2)
    final_softcap: float | None = None  # the same on the LM head's logits (Gemma 2)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        # model.json stores tuples as JSON lists: read back, they must compare (and hash) as tuples again
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"layer_types: unknown layer type {unknown[0]!r}; expected {SLIDING} or {FULL}")
        if self.family == "gemma3" and self.rope_local_theta is None:  # HF's rope_local_base_freq default
            object.__setattr__(self, "rope_local_theta", 10000.0)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be at least 1 (or None: no window)")

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def is_gemma(self) -> bool:
        """Gemma's structure: embeddings scaled by sqrt(d_model), RMSNorm with (1 + w), norms before and after
        attention and MLP, GeGLU."""
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over head_dim on each query and key head, before RoPE."""
        return self.family in ("qwen3", "gemma3")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether the layer attends within the sliding window."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == SLIDING
