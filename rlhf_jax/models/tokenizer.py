"""Thin layer over HF tokenizers: loading, left-padded prompt batches, and a tiny BPE for offline use."""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import transformers

from rlhf_jax.errors import UserError
from rlhf_jax.models import hf
from rlhf_jax.models.hf_config import MODEL_TYPES
from rlhf_jax.models.transformer import PAD_ID  # lives with the model that embeds it; importable from here too

EOS_TOKEN = "<|endoftext|>"

_splitting_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_splitting_lock = threading.Lock()


def splitting(tokenizer):
    """A copy of `tokenizer` that reads special-token text in what it encodes as text ("<|im_end|>" written in a
    prompt or response is no control token). transformers sets that as a flag on the tokenizer's backend for each
    call (`split_special_tokens=True`), so that a call with it and one without on one tokenizer in two threads (the
    input pipeline's readers) can encode either way: the copy is set once and never called otherwise, and the
    original is never switched."""
    with _splitting_lock:
        if tokenizer not in _splitting_copies:
            split = copy.deepcopy(tokenizer)
            split.split_special_tokens = True
            if hasattr(split, "_tokenizer"):  # a fast tokenizer's backend
                split._tokenizer.encode_special_tokens = True
            _splitting_copies[tokenizer] = split
        return _splitting_copies[tokenizer]


def load_tokenizer(path: str | os.PathLike, family: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; local files only, no remote code. With the model's `family`, built
    as transformers builds it beside that model's config.json: a family's tokenizer class may replace what the files
    say (Qwen2's splits digits one by one where a generic file's pre-tokenizer does not), so that an export's
    tokenizer/ (no config.json there) reads text as the HF checkpoint it came from does."""
    config = transformers.AutoConfig.for_model(MODEL_TYPES[family]) if family else None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), config=config, local_files_only=True,
                                                          trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(f"{path}: its tokenizer needs code of its own (tokenizer_config.json's auto_map), which is "
                        "never run; use a tokenizer that transformers builds itself (tokenizer.json)") from None


def check_same_tokenizer(tokenizer_dir, reference_dir, key: str, reference: str, chat_template: bool = False) -> None:
    """Refuses (one line naming `key`) a model whose tokenizer reads text otherwise than `reference`'s: other
    tokens behind the same ids, or another EOS or BOS id (the pad token is never read: padding is masked), or with
    `chat_template` (data.chat_template) another chat template, which wrote the prompts it was trained on otherwise.
    Models without tokenizer files are not compared; identical files are the same without building either."""
    if tokenizer_dir is None or reference_dir is None or _files_digest(tokenizer_dir) == _files_digest(reference_dir):
        return
    mine, theirs = load_tokenizer(tokenizer_dir), load_tokenizer(reference_dir)
    tokens, reference_tokens = ({i: t for t, i in tok.get_vocab().items()} for tok in (mine, theirs))
    ids = set(tokens) | set(reference_tokens)
    differ = sum(tokens.get(i) != reference_tokens.get(i) for i in ids)
    if differ:
        raise UserError(f"{key}: its tokenizer differs from {reference}'s ({differ} of {len(ids)} ids differ)")
    for name, attr in (("EOS", "eos_token_id"), ("BOS", "bos_token_id")):
        if getattr(mine, attr) != getattr(theirs, attr):
            raise UserError(f"{key}: its tokenizer differs from {reference}'s (its {name} id is "
                            f"{getattr(mine, attr)}, {reference}'s {getattr(theirs, attr)})")
    if chat_template and getattr(mine, "chat_template", None) != getattr(theirs, "chat_template", None):
        raise UserError(f"{key}: its tokenizer's chat template differs from {reference}'s (with data.chat_template "
                        f"the prompts it reads are written by {reference}'s, not as it was trained on)")


def _files_digest(tokenizer_dir) -> str:
    digest = hashlib.sha256()
    for name in hf.TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_chat_template(tokenizer, chat_template: bool, where: str = "") -> None:
    """data.chat_template asks for the tokenizer's chat template: a tokenizer without one is one line, naming the
    model it came with (`where`, such as 'model.path=PATH') where the caller knows it."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        whose = f"{where}: its tokenizer" if where else "the tokenizer"
        raise UserError(f"{whose} has no chat template (data.chat_template asks for one)")


class PromptEncoder:
    """The one way a prompt becomes token ids, for training, generation, PPO rollouts and evaluation alike.

    With `chat_template` the prompt is the user turn of the tokenizer's chat template, followed by the assistant
    header. A prompt longer than `max_tokens` loses its OLDEST content (the end of a dialogue matters most) but
    keeps its head: the BOS, or the template's leading tokens (system prompt, role header), which the model
    needs to read what follows.
    """

    def __init__(self, tokenizer, max_tokens: int, chat_template: bool = False):
        check_chat_template(tokenizer, chat_template)
        self.tokenizer, self.max_tokens, self.chat_template = tokenizer, max_tokens, chat_template
        self._splitting = splitting(tokenizer)
        # control tokens: Llama 3's <|start_header_id|> and <|eot_id|> are special added tokens without being named
        # special tokens (all_special_ids holds only its BOS and EOS)
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._control_texts = {*tokenizer.all_special_tokens, *added}
        self._control_ids = {*tokenizer.all_special_ids, *added.values()}
        # The head is what every prompt starts with: the common prefix of an empty and a non-empty prompt.
        a, b = self.encode_full(""), self.encode_full("a")
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        self.head = a[:n] if n < max_tokens else []

    def response_end_id(self) -> int | None:
        """The token that ends a response: with the chat template, the special token the template writes after an
        assistant turn (Gemma's <end_of_turn>, Llama 3's <|eot_id|>, Qwen's <|im_end|>, where a tokenizer's EOS
        may be another: Gemma's <eos>), so that training ends responses as the chat model does; else the EOS."""
        eos = self.tokenizer.eos_token_id
        if not self.chat_template:
            return eos
        marker = "Qz7"  # a text no template writes itself
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template without assistant turns: the EOS it is
            return eos
        after = text.rpartition(marker)[2]
        ids = list(self.tokenizer(after, add_special_tokens=False)["input_ids"]) if marker in text else []
        return ids[0] if ids and ids[0] in self._control_ids else eos

    def stop_ids(self, model_eos_ids: Sequence[int]) -> tuple[int, ...]:
        """The ids that end a sampled response: the model's EOS ids (the tokenizer's EOS when it names none) and
        the token training ends responses with (`response_end_id`), so that a chat model stops at its turn end
        (Qwen's <|im_end|>, where its EOS is <|endoftext|>)."""
        ids = (*(model_eos_ids or (self.tokenizer.eos_token_id,)), self.response_end_id())
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode_full(self, prompt: str) -> list[int]:
        """All ids of a prompt, untruncated. The prompt's text is text: a "<|im_end|>" in it is not the control
        token (the template's own are), so that a prompt cannot end its turn or write the assistant's."""
        if not self.chat_template:
            return list(self._splitting(prompt)["input_ids"])
        encode = lambda text, tokenizer=self.tokenizer: list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = self._render(prompt)
        if not any(token in prompt for token in self._control_texts):
            return encode(text)  # the whole text at once: the tokens the chat model was trained on
        # the template's parts around the prompt, found by rendering a marker no template writes
        before, marker, after = self._render("Qz7").partition("Qz7")
        if not (marker and text.startswith(before) and text.endswith(after)):
            raise UserError("the chat template changes a prompt with control-token text in it beyond recognition; "
                            f"remove the control tokens from the prompt: {prompt[:80]!r}")
        content = text[len(before):len(text) - len(after)]
        return encode(before) + encode(content, self._splitting) + encode(after)

    def _render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, prompt: str) -> tuple[list[int], bool]:
        """(ids of at most max_tokens, whether content was cut)."""
        return self.truncate(self.encode_full(prompt))

    def truncate(self, ids: list[int]) -> tuple[list[int], bool]:
        P = self.max_tokens
        if len(ids) <= P:
            return ids, False
        # as much of the head as the ids start with: a prompt's first characters can merge with the head's last
        # token (a template ending in "user\n" before HH-RLHF's "\n\nHuman:" and a tokenizer that joins newlines)
        k = next((i for i, (x, y) in enumerate(zip(ids, self.head)) if x != y), len(self.head))
        return ids[:k] + ids[len(ids) - (P - k):], True

    def batch(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids_BP, mask_BP, how many prompts were cut): every prompt encoded, left-padded to the longest."""
        encoded, cut = zip(*map(self, prompts)) if prompts else ((), ())
        width = max(1, max((len(e) for e in encoded), default=1))
        ids = np.full((len(prompts), width), PAD_ID, np.int32)
        mask = np.zeros((len(prompts), width), bool)
        for row, e in enumerate(encoded):
            if e:
                ids[row, width - len(e):] = e
                mask[row, width - len(e):] = True
        return ids, mask, sum(cut)

    def cut_warning(self, cut: int, total: int) -> str:
        """The line that says `cut` of `total` prompts lost content to the limit."""
        return (f"warning: {cut} of {total} prompts are longer than the limit of {self.max_tokens} tokens "
                "(sampling.max_prompt_tokens); their oldest content was cut")


class ResponseCodec:
    """The one way a response's text becomes ids and ids become text: as the continuation of a prompt, not as a
    text of its own. SentencePiece tokenizers (Llama 2, Mistral, TinyLlama) mark a word start at the beginning of
    every text they encode: alone, HH-RLHF's response " Hi" would become "▁▁Hi" where the model reads and samples
    "▁Hi" after "Assistant:", and a sampled "▁Hi" would decode to "Hi". Both ways go through an anchor, a newline
    that every tokenizer family keeps a token of its own, and drop it; a text whose first characters merge with it
    (one starting with a newline) is encoded after a letter instead."""

    ANCHORS = ("\n", "a")

    def __init__(self, tokenizer):
        self.tokenizer, self._splitting = tokenizer, splitting(tokenizer)
        self.anchor_ids = [self._ids(anchor) for anchor in self.ANCHORS]
        self.anchor_text = tokenizer.decode(self.anchor_ids[0])

    def _ids(self, text: str) -> list[int]:
        # a response's text is text: "<|im_end|>" written in it is not an EOS to train on (the EOS is appended)
        return list(self._splitting(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text as it reads after a prompt; one batched tokenizer call for most texts."""
        first = self.anchor_ids[0]
        out = []
        for text, ids in zip(texts, self._splitting([self.ANCHORS[0] + t for t in texts],
                                                    add_special_tokens=False)["input_ids"]):
            ids = list(ids)
            out.append(ids[len(first):] if first and ids[:len(first)] == first else self._encode_one(text))
        return out

    def _encode_one(self, text: str) -> list[int]:
        for anchor, anchor_ids in zip(self.ANCHORS[1:], self.anchor_ids[1:]):
            ids = self._ids(anchor + text)
            if anchor_ids and ids[:len(anchor_ids)] == anchor_ids:
                return ids[len(anchor_ids):]
        return self._ids(text)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids sampled after a prompt, special tokens (the EOS) left out."""
        text = self.tokenizer.decode(self.anchor_ids[0] + list(ids), skip_special_tokens=True)
        if self.anchor_ids[0] and text.startswith(self.anchor_text):
            return text[len(self.anchor_text):]
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


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
