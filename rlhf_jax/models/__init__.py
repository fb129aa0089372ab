"""The transformer, sampling, tokenizers, HF conversion, checkpoints, generation and the tiny model."""
