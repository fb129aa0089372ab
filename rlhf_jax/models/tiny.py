"""The tiny built-in model: a byte-level BPE trained on bundled text and a small random Llama, saved as an HF
checkpoint directory, so that everything runs offline with no downloads."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import jax

from rlhf_jax.models import hf
from rlhf_jax.models.tokenizer import train_tiny_tokenizer
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model
from rlhf_jax.runtime import fsio


def bundled_prompts() -> list[str]:
    text = resources.files("rlhf_jax").joinpath("assets/prompts.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def tiny_config(vocab_size: int, eos_id: int, pad_id: int, family: str = "llama") -> ModelConfig:
    return ModelConfig(family=family, vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=4 if family == "gpt2" else 2, head_dim=16, d_ff=128 if family != "gpt2" else 256,
                       max_position_embeddings=512, bos_token_id=eos_id, eos_token_ids=(eos_id,),
                       pad_token_id=pad_id)


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, family: str = "llama",
                     vocab_size: int = 512, overwrite: bool = False, corpus: list[str] | None = None) -> Path:
    """Write a random tiny model with its tokenizer (trained on `corpus`, default the bundled text) to `out_dir`
    (an HF checkpoint directory), as a whole: an existing non-empty `out_dir` is refused unless `overwrite`
    (fsio.replace_dir)."""
    if corpus is None:
        corpus = resources.files("rlhf_jax").joinpath("assets/corpus.txt").read_text().splitlines()
    with fsio.replace_dir(out_dir, overwrite) as tmp:
        tokenizer = train_tiny_tokenizer(corpus, vocab_size, tmp)
        cfg = tiny_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, family)
        params = jax.device_get(init_params(make_model(cfg), jax.random.key(seed)))
        hf.write_hf(tmp, params, cfg, tokenizer_dir=tmp)
    return Path(out_dir)


def resolve_model_path(path: str, run_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The configured model, or (for an empty path) the tiny built-in one, built once into the run dir."""
    if path:
        return Path(path)
    from rlhf_jax.runtime import distributed

    tiny = Path(run_dir) / "tiny_model"
    if not distributed.on_primary(lambda: (tiny / "config.json").exists()):  # process 0 builds it for all
        distributed.on_primary(lambda: str(build_tiny_model(tiny, seed=seed, overwrite=True)))
    return tiny
