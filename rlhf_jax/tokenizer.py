"""Thin layer over HF tokenizers: loading, left-padded prompt batches, and a tiny BPE for offline use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import transformers

PAD_ID = -1  # never a real token: masks carry the truth and the model embeds out-of-range ids as 0
EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; local files only, no remote code."""
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def encode_prompts(tokenizer, prompts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BP, mask_BP): prompts truncated from the left to `max_tokens`, left-padded to the longest."""
    encoded = [tokenizer(p)["input_ids"][-max_tokens:] for p in prompts]
    width = max(1, max(len(e) for e in encoded))
    ids = np.full((len(prompts), width), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, e in enumerate(encoded):
        if e:
            ids[row, width - len(e):] = e
            mask[row, width - len(e):] = True
    return ids, mask


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """A byte-level BPE trained in milliseconds on local text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                                pad_token="<|pad|>")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
