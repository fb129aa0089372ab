"""The tiny built-in model: a byte-level BPE trained on bundled text and a small random Llama, saved as an HF
checkpoint directory, so that everything runs offline with no downloads."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import jax

from rlhf_jax import hf
from rlhf_jax.model import ModelConfig, init_params, make_model
from rlhf_jax.tokenizer import train_tiny_tokenizer


def bundled_prompts() -> list[str]:
    text = resources.files("rlhf_jax").joinpath("assets/prompts.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def tiny_config(vocab_size: int, eos_id: int, pad_id: int, family: str = "llama") -> ModelConfig:
    return ModelConfig(family=family, vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=4 if family == "gpt2" else 2, head_dim=16, d_ff=128 if family != "gpt2" else 256,
                       max_position_embeddings=512, bos_token_id=eos_id, eos_token_ids=(eos_id,),
                       pad_token_id=pad_id)


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, family: str = "llama",
                     vocab_size: int = 512) -> Path:
    """Write a random tiny model with its tokenizer to `out_dir` (an HF checkpoint directory)."""
    out_dir = Path(out_dir)
    corpus = resources.files("rlhf_jax").joinpath("assets/corpus.txt").read_text().splitlines()
    tokenizer = train_tiny_tokenizer(corpus, vocab_size, out_dir)
    cfg = tiny_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, family)
    params = jax.device_get(init_params(make_model(cfg), jax.random.key(seed)))
    hf.save_hf(out_dir, params, cfg, tokenizer_dir=out_dir)
    return out_dir


def resolve_model_path(path: str, run_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The configured model, or (for an empty path) the tiny built-in one, built once into the run dir."""
    if path:
        return Path(path)
    tiny = Path(run_dir) / "tiny_model"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny, seed=seed)
    return tiny
