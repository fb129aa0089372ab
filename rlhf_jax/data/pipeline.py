"""Grain input pipelines over prepared datasets: tokenize, truncate, pad to fixed shapes, shuffle, shard, batch.

Layouts (numpy, fixed shapes; P prompt tokens, R response tokens, K responses, T = P + R):
  sft       ids_T, mask_T, response_mask_T, positions_T, segment_ids_T, truncated
            [left-padded prompt | right-padded response]; packed: several examples per row, segment ids 1, 2, ...
  rankings  prompt_ids_P, prompt_mask_P, response_ids_KR, response_mask_KR, pairs_KK, example_index, truncated
            one example per prompt: its unique responses in slots 0.. (empty slots all padding; a response that
            ended has its EOS, one cut at a sampler's length limit none),
            pairs_KK[i, j] = how many times response i was preferred to response j (int32), and the example's
            position in its split (int32), by which values computed once per example are looked up
  prompts   prompt_ids_P, prompt_mask_P, example_index, truncated
Prompts are truncated from the left (the end of a dialogue matters most), responses from the right; `truncated`
marks each example that lost tokens so that trainers count them (a packed row: how many of its examples did).
Pad ids are PAD_ID; masks carry the truth.

Training order is a global shuffle from the seed, reshuffled every epoch; host h of n reads rows h, h + n, ... of
it, so the n hosts together see exactly the global batches. The iterator's state (`get_state`/`set_state`)
goes into checkpoints, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format

from rlhf_jax.config import DataSection
from rlhf_jax.data.formats import KINDS
from rlhf_jax.data.prepare import RANKINGS_LAYOUT, dataset_dir
from rlhf_jax.errors import UserError
from rlhf_jax.models.tokenizer import PAD_ID, PromptEncoder, ResponseCodec


READ_THREADS = 8


def open_split(data_dir: str | Path, name: str, split: str):
    """(random-access source, our metadata) of one split of a prepared dataset."""
    path = dataset_dir(data_dir, name)
    if not (path / "dataset_info.json").exists():
        raise UserError(f"{path}: no prepared dataset named {name!r} in data.dir={data_dir} (python -m rlhf_jax.data "
                        f"... --data-dir {data_dir} --name {name} prepares it)")
    again = f"prepare it again (python -m rlhf_jax.data ... --name {name} --overwrite)"
    try:
        builder = tfds.builder_from_directory(str(path))
        splits, metadata = builder.info.splits, dict(builder.info.metadata or {})
    except (ValueError, OSError, json_format.ParseError) as e:
        raise UserError(f"{path}: a damaged prepared dataset ({str(e).splitlines()[0][:120]}); {again}") from None
    if split not in splits:
        raise UserError(f"{path}: no split {split!r}; available: {sorted(splits)}")
    missing = [f.name for f in splits[split].filepaths if not f.exists()]
    if missing or metadata.get("kind") not in KINDS:
        what = f"file {missing[0]} is missing" if missing else "metadata.json names no dataset kind"
        raise UserError(f"{path}: a damaged prepared dataset ({what}); {again}")
    return builder.as_data_source(split=split), metadata


def stored_prompts(source, limit: int = 0) -> list[str]:
    """The prompt texts of an opened split (`open_split`), in stored order; the first `limit` when > 0."""
    return [stored_text(source[i]["prompt"]) for i in range(min(limit or len(source), len(source)))]


def stored_metadata(source, limit: int = 0) -> list:
    """The metadata of each prompt `stored_prompts` reads, parsed (`parsed_metadata`)."""
    return [parsed_metadata(source[i]["metadata"]) for i in range(min(limit or len(source), len(source)))]


def stored_text(value) -> str:
    """A stored Text feature as a str (TFDS reads it as bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parsed_metadata(value):
    """A stored example's metadata (compact JSON; empty where its row had none) as the JSON value, or None."""
    text = stored_text(value)
    return json.loads(text) if text else None


def has_split(spec: DataSection, split: str) -> bool:
    """Whether the prepared dataset `spec.name` has `split`."""
    try:
        open_split(spec.dir, spec.name, split)
        return True
    except UserError:
        return False


STORED_INDEX = "stored_index"  # the key `WithStoredIndex` adds to a stored example


class WithStoredIndex:
    """A stored example with its position in its split of `size` examples (read by `Tokenize` for rankings). A
    map before grain's `repeat` is handed the index over all epochs, whose remainder is the stored position."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, index: int, example: dict) -> dict:
        return {**example, STORED_INDEX: index % self.size}


class Tokenize:
    """Turns one stored example into fixed-shape numpy arrays (see the module docstring)."""

    def __init__(self, tokenizer, kind: str, spec: DataSection, max_responses: int):
        self.tok, self.kind, self.spec, self.K = tokenizer, kind, spec, max_responses
        self.prompt_ids = PromptEncoder(tokenizer, spec.max_prompt_tokens, spec.chat_template)
        self.responses = ResponseCodec(tokenizer)
        self.eos = self.prompt_ids.response_end_id()
        if kind != "prompts" and self.eos is None:  # every response ends with it
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or ''}: has no EOS token, which "
                            "ends every response (set eos_token in its tokenizer_config.json)")

    def response_ids(self, responses: list[str], ended: list[bool] | None = None) -> list[tuple[list[int], bool]]:
        """Each response, read as the prompt's continuation, + EOS where it ended (a sample cut at the sampler's
        length limit has none, as a cut rollout has none where PPO scores it), cut to R tokens."""
        R = self.spec.max_response_tokens
        out = []
        ended = [True] * len(responses) if ended is None else ended
        for ids, end in zip(self.responses.encode(responses), ended, strict=True):
            ids = ids + [self.eos] * bool(end)
            out.append((ids[:R], len(ids) > R))
        return out

    def __call__(self, example: dict) -> dict[str, Any]:
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v
        P, R = self.spec.max_prompt_tokens, self.spec.max_response_tokens
        prompt, cut = self.prompt_ids(text(example["prompt"]))
        prompt_ids, prompt_mask = _left_pad(prompt, P)
        index = np.int32(example.get(STORED_INDEX, -1))
        if self.kind == "prompts":
            return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "example_index": index,
                    "truncated": np.bool_(cut)}
        if self.kind == "sft":
            (response, cut_r), = self.response_ids([text(example["response"])])
            if self.spec.pack:  # real tokens only; packing lays them out
                ids = np.asarray(prompt + response, np.int32)
                return {"ids": ids, "response_mask": np.arange(len(ids)) >= len(prompt),
                        "truncated": np.full(len(ids), cut or cut_r)}
            response_ids, response_mask = _right_pad(response, R)
            mask = np.concatenate([prompt_mask, response_mask])
            return {"ids": np.concatenate([prompt_ids, response_ids]), "mask": mask,
                    "response_mask": np.concatenate([np.zeros(P, bool), response_mask]),
                    "positions": np.maximum(np.cumsum(mask) - 1, 0).astype(np.int32),
                    "segment_ids": mask.astype(np.int32), "truncated": np.bool_(cut or cut_r)}
        responses = [text(r) for r in example["responses"]]
        if len(responses) > self.K:
            raise UserError(f"an example has {len(responses)} responses but data.max_responses is {self.K}")
        response_ids = np.full((self.K, R), PAD_ID, np.int32)
        response_mask = np.zeros((self.K, R), bool)
        # "ended" is absent from datasets prepared before it was stored: every response ended
        ended = [bool(e) for e in example.get("ended", [True] * len(responses))]
        for k, (ids, cut_k) in enumerate(self.response_ids(responses, ended)):
            response_ids[k], response_mask[k] = _right_pad(ids, R)
            cut = cut or cut_k
        pairs = np.zeros((self.K, self.K), np.int32)  # add.at: a repeated pair counts once per repeat
        np.add.at(pairs, (np.asarray(example["better"], np.intp), np.asarray(example["worse"], np.intp)), 1)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
                "response_mask": response_mask, "pairs": pairs, "example_index": index, "truncated": np.bool_(cut)}


def _left_pad(ids: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    out, mask = np.full(width, PAD_ID, np.int32), np.zeros(width, bool)
    if ids:
        out[width - len(ids):], mask[width - len(ids):] = ids, True
    return out, mask


def _right_pad(ids: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    out, mask = np.full(width, PAD_ID, np.int32), np.zeros(width, bool)
    out[:len(ids)], mask[:len(ids)] = ids, True
    return out, mask


def _packed_layout(example: dict) -> dict:
    """FirstFitPack output -> the sft layout (segment ids and positions restart per packed example)."""
    seg = example["ids_segment_ids"].astype(np.int32)
    return {"ids": np.where(seg > 0, example["ids"], PAD_ID).astype(np.int32), "mask": seg > 0,
            "response_mask": example["response_mask"].astype(bool) & (seg > 0),
            "positions": example["ids_positions"].astype(np.int32), "segment_ids": seg,
            # the examples of the row that were cut (each segment carries its example's flag at every position)
            "truncated": np.int32(len(np.unique(seg[example["truncated"].astype(bool) & (seg > 0)])))}


def response_slots(kind: str, metadata: dict, spec: DataSection) -> int:
    """K, the response slots per rankings example (0 for other kinds); refuses a dataset it cannot read."""
    if kind != "rankings":
        return 0
    if metadata.get("rankings_layout") != RANKINGS_LAYOUT:
        raise UserError(f"{dataset_dir(spec.dir, spec.name)}: rankings prepared in an older layout (not grouped "
                        "by prompt); prepare it again with python -m rlhf_jax.data ... --overwrite")
    stored = int(metadata.get("max_responses", 0))
    if spec.max_responses and spec.max_responses < stored:
        raise UserError(f"data.max_responses={spec.max_responses} but the dataset has prompts with {stored} "
                        "responses; raise it or set 0 for the dataset's largest K")
    return spec.max_responses or stored


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def train_dataset(spec: DataSection, split: str, tokenizer, global_batch: int, seed: int,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """Shuffled, repeated, host-sharded, batched training data. `iter()` of it has get_state/set_state."""
    source, metadata = open_split(spec.dir, spec.name, split)
    kind = metadata["kind"]
    index, count = _host(process_index, process_count)
    if global_batch % count:
        raise UserError(f"global batch {global_batch} is not divisible by {count} hosts")
    if spec.pack and kind != "sft":
        raise UserError("data.pack applies to sft datasets only")
    ds = grain.MapDataset.source(source).map_with_index(WithStoredIndex(len(source)))
    ds = ds.seed(seed).shuffle().repeat(num_epochs)
    tokenize = Tokenize(tokenizer, kind, spec, response_slots(kind, metadata, spec))
    per_host = global_batch // count
    # Tokenization runs in reader threads (the tokenizer releases the GIL); order stays deterministic.
    if not spec.pack:
        # Host i reads the i-th block of rows of each global batch, so a global batch holds the same rows in the
        # same order for any number of hosts (and an iterator position, in batches, means the same for all).
        batches = ds.map(tokenize).batch(per_host, drop_remainder=True)[index::count]
        return batches.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_THREADS))
    length = spec.max_prompt_tokens + spec.max_response_tokens
    packed = grain.experimental.FirstFitPackIterDataset(
        ds[index::count].map(tokenize).to_iter_dataset(
            grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=4 * per_host)),
        length_struct={"ids": length, "response_mask": length, "truncated": length},
        num_packing_bins=max(per_host, 8), seed=seed)
    return packed.map(_packed_layout).batch(per_host, drop_remainder=True)


def eval_batches(spec: DataSection, split: str, tokenizer, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """Every example of a split once, in stored order, in global batches of `batch_size` rows of which this host
    yields its block (the i-th of `process_count`); `valid` marks the real rows of the last batch."""
    source, metadata = open_split(spec.dir, spec.name, split)
    kind = metadata["kind"]
    index, count = _host(process_index, process_count)
    if batch_size % count:
        raise UserError(f"eval batch {batch_size} is not divisible by {count} hosts")
    per_host = batch_size // count
    tokenize = Tokenize(tokenizer, kind, dataclasses.replace(spec, pack=False), response_slots(kind, metadata, spec))
    indexed = WithStoredIndex(len(source))
    filler = tokenize(indexed(0, source[0]))
    for b in range(-(-len(source) // batch_size)):  # every host runs the same batches: collectives line up
        start = b * batch_size + index * per_host
        stop = min(start + per_host, len(source))
        examples = [tokenize(indexed(i, source[i])) for i in range(start, stop)]
        valid = np.arange(per_host) < len(examples)
        examples += [filler] * (per_host - len(examples))  # masked out by `valid`
        yield {**{k: np.stack([e[k] for e in examples]) for k in filler}, "valid": valid}
