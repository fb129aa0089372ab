"""Pieces every training stage shares: weight decay by parameter kind, turning an LM into a reward model without
initialising a model, the step count from epochs, and the one prompt encoder (truncation keeps the head)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
import transformers

from rlhf_jax.config import load_config, OptimSection
from rlhf_jax.errors import UserError
from rlhf_jax.models.hf_config import config_from_hf
from rlhf_jax.models.tokenizer import PromptEncoder
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model
from rlhf_jax.training import run, state as training_state, steps

from test_model import FULL_SIZE


def _tiny(family: str, **kw) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1 if family != "gpt2"
                       else 2, head_dim=8, d_ff=32, max_position_embeddings=32, **kw)


@pytest.mark.parametrize("cfg", [_tiny("gpt2"), _tiny("qwen2", qkv_bias=True, mlp_bias=True)], ids=["gpt2", "qwen2"])
def test_weight_decay_hits_only_weight_matrices(cfg):
    """With zero gradients AdamW's update is the decay alone: weight matrices and embeddings shrink by
    lr * weight_decay; norms and every bias (the fused qkv_bias and wi_bias have 2+ dimensions) stay put."""
    params = init_params(make_model(cfg), jax.random.key(0))
    params = jax.tree.map(lambda x: x + 1.0, params)  # norms and biases start at 1/0: make every leaf non-zero
    optimizer = steps.make_optimizer(OptimSection(lr=0.1, schedule="constant", weight_decay=0.5, grad_clip=0.0), 10)
    @jax.jit
    def apply(params):
        updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = apply(params)
    decayed, kept = set(), set()
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        after = new
        for key in path:
            after = after[key.key]
        name = path[-1].key
        if np.allclose(after, before * (1 - 0.1 * 0.5), rtol=1e-6):
            decayed.add(name)
        else:
            np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
            kept.add(name)
    weights = {"embed", "qkv", "o", "wi", "wo", "lm_head"} | ({"pos_embed"} if cfg.is_gpt2 else set())
    assert decayed == weights
    assert "qkv_bias" in kept and "wi_bias" in kept and "scale" in kept and not decayed & kept


def test_reward_head_from_an_lm_allocates_nothing_model_sized():
    """Turning an 8B LM into a reward model adds a (d_model, 1) head: traced on abstract 8B params, no
    intermediate of the computation is bigger than the head."""
    cfg, _ = config_from_hf(FULL_SIZE["llama3_8b"][0])
    abstract = jax.eval_shape(lambda: init_params(make_model(cfg), jax.random.key(0)))
    jaxpr = jax.make_jaxpr(lambda p: training_state.with_head(p, cfg, "lm", "scalar", jax.random.key(0)))(abstract)
    sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert sizes and max(sizes) <= cfg.d_model
    out = jax.eval_shape(lambda p: training_state.with_head(p, cfg, "lm", "scalar", jax.random.key(0)), abstract)
    assert "lm_head" not in out and out["score"].shape == (cfg.d_model, 1)
    assert out["embed"].shape == abstract["embed"].shape
    with pytest.raises(UserError, match="'lm'-head model from a 'scalar'-head"):
        training_state.with_head(abstract, cfg, "scalar", "lm", jax.random.key(0))


@pytest.mark.parametrize("overrides, examples, expected", [
    (["train.steps=7"], 1000, 7),
    (["train.epochs=1", "train.batch_size=16"], 100, 6),  # never past the end of the epoch
    (["train.epochs=16", "train.batch_size=16"], 100, 100),
    (["train.epochs=0.5", "train.batch_size=8"], 100, 6),
    (["train.epochs=1", "train.batch_size=64"], 10, 1),
])
def test_total_steps_from_steps_or_epochs(overrides, examples, expected):
    assert training_state.total_steps(load_config(None, overrides), examples) == expected


def test_total_steps_needs_steps_or_epochs():
    with pytest.raises(UserError, match="train.steps or train.epochs"):
        training_state.total_steps(load_config(None, []), 100)
    with pytest.raises(UserError, match="data.pack"):
        training_state.total_steps(load_config(None, ["stage=sft", "train.epochs=1", "data.pack=true"]), 100)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that adds a BOS to every text (as Llama's does), with a chat template."""
    words = ["<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>", "system", "rules"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("<s> system rules <|user|> {% for m in messages %}{{ m['content'] }}{% endfor %} <|end|>"
                          "{% if add_generation_prompt %} <|assistant|>{% endif %}")
    return fast


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_left_truncation_keeps_the_bos(bos_tokenizer):
    encode = PromptEncoder(bos_tokenizer, max_tokens=5)
    full = encode.encode_full(_words(10))
    assert full[0] == bos_tokenizer.bos_token_id and len(full) == 11
    ids, cut = encode(_words(10))
    assert cut and ids == [full[0]] + full[-4:]  # BOS, then the newest content
    assert encode(_words(4)) == (full[:5], False)


def test_left_truncation_keeps_the_chat_template_head(bos_tokenizer):
    encode = PromptEncoder(bos_tokenizer, max_tokens=9, chat_template=True)
    vocab = bos_tokenizer.get_vocab()
    head = [vocab[w] for w in ("<s>", "system", "rules", "<|user|>")]
    tail = [vocab["<|end|>"], vocab["<|assistant|>"]]
    assert encode.head == head
    ids, cut = encode(_words(10))
    assert cut and len(ids) == 9
    assert ids == head + [vocab["w7"], vocab["w8"], vocab["w9"]] + tail  # oldest content dropped, not the head
    short, cut = encode(_words(2))
    assert not cut and short == head + [vocab["w0"], vocab["w1"]] + tail


def test_left_truncation_keeps_the_head_when_the_prompt_merges_into_its_last_token():
    """ChatML's head ends in "user\n"; HH-RLHF's prompts start with "\n\nHuman:", and a tokenizer that joins
    newlines encodes "\n\n\n" as one token: the head's last id is not there, and the whole head was dropped."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["\n\nHuman: hello there\n\nAssistant: fine"] * 50 + ["system\nuser\nassistant\n"] * 20
                            + ["x\n\n\ny"] * 30, trainers.BpeTrainer(
                                vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("<|im_start|>system\nBe helpful.<|im_end|>\n{% for m in messages %}<|im_start|>"
                          "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    encode = PromptEncoder(fast, max_tokens=30, chat_template=True)
    prompt = "\n\nHuman: hello there" * 8 + "\n\nAssistant:"
    assert encode.encode_full(prompt)[:len(encode.head)] != encode.head  # the merge
    ids, cut = encode(prompt)
    assert cut and len(ids) == 30
    text = fast.decode(ids)
    assert text.startswith("<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user"), text
    assert text.endswith("hello there\n\nAssistant:<|im_end|>\n<|im_start|>assistant\n"), text


def test_one_encoder_serves_training_and_generation(bos_tokenizer):
    """The data pipeline and the generator's batches encode a prompt identically (template and truncation)."""
    from rlhf_jax.config import DataSection
    from rlhf_jax.data.pipeline import Tokenize

    spec = DataSection(max_prompt_tokens=9, chat_template=True)
    row = Tokenize(bos_tokenizer, "prompts", spec, 0)({"prompt": _words(12).encode()})
    encoder = PromptEncoder(bos_tokenizer, 9, chat_template=True)
    ids_BP, mask_BP, cut = encoder.batch([_words(12), _words(1)])
    np.testing.assert_array_equal(row["prompt_ids"][row["prompt_mask"]], ids_BP[0][mask_BP[0]])
    assert mask_BP[1].sum() == 7 and not mask_BP[1][:2].any()  # the short prompt is left-padded
    assert cut == 1 and encoder.cut_warning(cut, 2).startswith("warning: 1 of 2 prompts are longer than the limit "
                                                                "of 9 tokens")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequences_past_the_model_positions_are_refused(family):
    """GPT-2 would read past its position table (NaN); rotary models were never trained there."""
    with pytest.raises(UserError, match="data.max_prompt_tokens \\+ data.max_response_tokens = 40 exceeds the "
                                        "model's 32 positions"):
        training_state.check_positions(_tiny(family), 40, "data.max_prompt_tokens + data.max_response_tokens")
    training_state.check_positions(_tiny(family), 32, "x")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signals_record_the_first_signal_stop_at_the_second_and_restore_handlers(sig):
    """The handler behind the exit-4 stop (the subprocess test sends SIGTERM): both signals are caught, the
    second one stops at once, and the previous handlers come back."""
    before = signal.getsignal(sig)
    with run.StopSignals() as stop:
        os.kill(os.getpid(), sig)
        assert stop.received == sig
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
        # a third signal kills the process, as it would without a handler (not a KeyboardInterrupt in a save)
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(sig) is before


def test_a_third_signal_while_a_save_is_held_kills_the_process():
    """The second signal waits for the save in hand (`holding_second`); a third one must not raise into it (a
    KeyboardInterrupt from the handler before ours, in the middle of a save)."""
    code = ("import os, signal, time\n"
            "from rlhf_jax.runtime.signals import sigterm_as_ctrl_c\n"
            "from rlhf_jax.training.run import StopSignals\n"
            "with sigterm_as_ctrl_c(), StopSignals() as stop, stop.holding_second():\n"  # as the CLIs run a stage
            "    for _ in range(3):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.2)\n"
            "    print('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == -signal.SIGTERM and "survived" not in done.stdout, (done.returncode, done.stderr)
