"""Tiny random transformers models of each supported family, saved locally (torch is a test-only dependency)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96

# name -> (config class, kwargs); covers GPT-2, Llama with GQA and Llama-3 rope scaling, Qwen2 biases,
# tied and untied embeddings.
FAMILIES = {
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=1,
                                           bos_token_id=1, pad_token_id=0)),
    "gpt2_untied": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                  tie_word_embeddings=False, eos_token_id=1, bos_token_id=1,
                                                  pad_token_id=0)),
    "llama_gqa_llama3": (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        eos_token_id=[1, 2], bos_token_id=3, pad_token_id=0)),
    "llama_tied": (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, mlp_bias=True,  # gate/up bias
        eos_token_id=1, pad_token_id=0)),
    "qwen2": (transformers.Qwen2Config, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, tie_word_embeddings=True,
        eos_token_id=1, pad_token_id=0)),
    # The newer families, each with its own head_dim != hidden / heads where it has one. Windows of 6 slots: the
    # tests' prompts (12 wide, left-padded) and generations run past them.
    "qwen3": (transformers.Qwen3Config, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1,  # layer 1 slides
        eos_token_id=1, pad_token_id=0)),
    "mistral": (transformers.MistralConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=6, eos_token_id=1, bos_token_id=3,
        pad_token_id=0)),
    # Soft-caps small enough to bend this tiny model's scores (|scores| ~ 0.1) and logits (~ 0.5).
    "gemma2": (transformers.Gemma2Config, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=128,
        sliding_window=6, attn_logit_softcapping=0.1, final_logit_softcapping=0.5, eos_token_id=1, bos_token_id=3,
        pad_token_id=0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, max_position_embeddings=128,
        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)},
        eos_token_id=[1, 2], bos_token_id=3, pad_token_id=0)),
}
CAUSAL_LM = {transformers.GPT2Config: transformers.GPT2LMHeadModel,
             transformers.LlamaConfig: transformers.LlamaForCausalLM,
             transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
             transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
             transformers.MistralConfig: transformers.MistralForCausalLM,
             transformers.Gemma2Config: transformers.Gemma2ForCausalLM,
             transformers.Gemma3TextConfig: transformers.Gemma3ForCausalLM}


def make_hf_model(name: str, out_dir, seed: int = 0):
    """Build, randomise (biases and norms too, so every tensor matters) and save a tiny model; return it."""
    cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    model = CAUSAL_LM[cls](cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


TOKENIZER_WORDS = [f"w{i}" for i in range(37)]  # ids 3..39: a tokenizer smaller than VOCAB, like Qwen2.5's


def make_tokenizer(out_dir, pad_is_eos: bool):
    """A word-level tokenizer with <unk>=0, <eos>=1 and <pad>=2; with `pad_is_eos` it pads with <eos> and ships a
    generation_config.json saying so, as Qwen2.5 does. Returns it."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(TOKENIZER_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                                pad_token="<eos>" if pad_is_eos else "<pad>")
    fast.save_pretrained(str(out_dir))
    if pad_is_eos:
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 1}))
    return fast
