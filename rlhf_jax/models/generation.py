"""Batch text generation with the jit-compiled, mesh-sharded sampler: prompt files and the Generator that `python -m
rlhf_jax.generate`, the generate and label stages and the evaluator share."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from rlhf_jax.errors import UserError, json_error
from rlhf_jax.models.checkpoint import LoadedModel, warn_prompt_form
from rlhf_jax.models.sampling import SamplingParams, sample, tokenizer_vocab
from rlhf_jax.models.tokenizer import PAD_ID, PromptEncoder, ResponseCodec, check_chat_template, load_tokenizer
from rlhf_jax.models.transformer import make_model, param_logical_axes, params_for
from rlhf_jax.runtime import distributed, sharding
from rlhf_jax.runtime.progress import progress as progress_bar


class PromptFileError(UserError):
    """A prompt file that cannot be read."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl / .json file ({"prompt": ...} per line)."""
    return read_prompt_rows(path)[0]


def read_prompt_rows(path: str | Path) -> tuple[list[str], list]:
    """(prompts, the metadata of each) of a prompt file (`read_prompts`): a .jsonl row's "metadata" field, None
    where it has none and for every line of a text file."""
    path = Path(path)
    try:
        # lines end at "\n" (and "\r\n") only: str.splitlines would also split at U+2028, form feeds and the like
        lines = [line.removesuffix("\r") for line in path.read_bytes().decode("utf-8-sig").split("\n")]
    except FileNotFoundError:
        raise PromptFileError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"{path}: {e.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    prompts, metadata, jsonl = [], [], path.suffix.lower() in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        row = {}
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{n}: {json_error(e)}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptFileError(f'{path}:{n}: expected an object with a string "prompt" field')
            line = row["prompt"]
        if not line.strip():
            raise PromptFileError(f"{path}:{n}: empty prompt")
        prompts.append(line)
        metadata.append(row.get("metadata"))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts, metadata


class Generator:
    """Holds a model placed on a mesh and one compiled sampler for fixed (batch, prompt, new-token) shapes."""

    def __init__(self, loaded: LoadedModel, mesh, params: SamplingParams, dtype: str = "float32",
                 chat_template: bool = False, where: str = "the checkpoint"):
        """`where` names the checkpoint in errors (its path, or the config key that gave it)."""
        if loaded.head != "lm":
            raise UserError(f"{where}: a reward/value model (scalar head), expected a policy")
        if loaded.tokenizer_dir is None:  # callers load with need_tokenizer=True, which names the path
            raise UserError("the checkpoint has no tokenizer files")
        warn_prompt_form(loaded, chat_template, where)
        self.cfg = loaded.cfg
        self.mesh = mesh
        self.model = make_model(loaded.cfg, dtype=dtype)
        self.tokenizer = load_tokenizer(loaded.tokenizer_dir, loaded.cfg.family)
        check_chat_template(self.tokenizer, chat_template, where)
        self.responses = ResponseCodec(self.tokenizer)
        self.chat_template = chat_template  # as the model was trained: prompts are encoded the same way
        eos = params.eos_ids or PromptEncoder(self.tokenizer, 1, chat_template).stop_ids(loaded.cfg.eos_token_ids)
        self.params_cfg = dataclasses.replace(params, eos_ids=tuple(eos), vocab=tokenizer_vocab(self.tokenizer,
                                                                                                 loaded.cfg))
        # Inference stores weights in the compute dtype, so the decode loop never re-casts them.
        params = params_for(self.model, jax.tree.map(lambda x: np.asarray(x).astype(dtype), loaded.params))
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        param_sh = sharding.param_shardings(param_logical_axes(self.model), shapes, mesh)
        for warning in sharding.sharding_report(param_logical_axes(self.model), shapes, mesh).fallbacks:
            print(warning, file=sys.stderr)  # a replicated dimension costs memory: never silently
        self.params = sharding.place(params, param_sh)
        batch_sh = self.batch_sh = sharding.batch_sharding(mesh)
        self._sample = sharding.jit(functools.partial(sample, self.model, p=self.params_cfg), mesh,
                                    in_shardings=(param_sh, batch_sh, batch_sh, sharding.replicated(mesh)),
                                    out_shardings=batch_sh)

    def generate(self, prompts: Sequence[str], batch_size: int, max_prompt_tokens: int, seed: int = 0,
                 progress: bool = True) -> Iterator[dict]:
        """One record per prompt, in order: prompt, prompt_ids, ids (EOS kept, padding dropped), text, logprobs."""
        sharding.check_batch_size(batch_size, self.mesh, "sampling.batch_size")
        encoder = PromptEncoder(self.tokenizer, max_prompt_tokens, self.chat_template)
        ids_all, mask_all, cut = encoder.batch(prompts)
        if cut and distributed.is_primary():
            print(encoder.cut_warning(cut, len(prompts)), file=sys.stderr)
        width = ids_all.shape[1]  # one prompt width for the whole file: one compilation
        if width + self.params_cfg.max_new_tokens > self.cfg.max_position_embeddings:
            raise UserError(f"the longest prompt ({width} tokens) + sampling.max_new_tokens "
                            f"({self.params_cfg.max_new_tokens}) = {width + self.params_cfg.max_new_tokens} exceeds "
                            f"the model's {self.cfg.max_position_embeddings} positions")
        rng = jax.random.key(seed)
        bar = progress_bar(len(prompts), "generate", "prompt", enabled=progress and distributed.is_primary())
        for start in range(0, len(prompts), batch_size):
            n = min(batch_size, len(prompts) - start)
            ids = np.full((batch_size, width), PAD_ID, np.int32)
            mask = np.zeros((batch_size, width), bool)
            ids[:n], mask[:n] = ids_all[start:start + n], mask_all[start:start + n]
            mask[n:, -1] = True  # filler rows keep one real token so every row is well defined
            t0 = time.perf_counter()
            out = distributed.to_host(self._sample(self.params, *sharding.place((ids, mask), (self.batch_sh,) * 2),
                                                   jax.random.fold_in(rng, start)))
            new_tokens = int(out.mask_BN[:n].sum())
            bar.update(n)
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
            for row in range(n):
                keep = out.mask_BN[row]
                gen_ids = out.tokens_BN[row][keep].tolist()
                yield {"prompt": prompts[start + row], "prompt_ids": ids[row][mask[row]].tolist(), "ids": gen_ids,
                       "text": self.responses.decode(gen_ids),
                       "ended": bool(gen_ids) and gen_ids[-1] in self.params_cfg.eos_ids,
                       "logprobs": [round(float(x), 6) for x in out.logprobs_BN[row][keep]]}
        bar.close()


def parse_mesh_shape(text: str) -> list[int]:
    try:
        shape = [int(s) for s in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3:
        raise UserError(f"--mesh-shape expects 3 comma-separated ints (data,fsdp,tensor), got {text!r}")
    if not all(n == -1 or n >= 1 for n in shape) or shape.count(-1) > 1:
        raise UserError(f"--mesh-shape entries must be >= 1 or -1 (the devices left, at most once), got {text!r}")
    return shape


def mesh_shape_as_one(argv: Sequence) -> list[str]:
    """argv with `--mesh-shape -1,2,1` written `--mesh-shape=-1,2,1`: argparse takes a value that starts with '-'
    for an option."""
    args, out = [str(a) for a in argv], []
    while args:
        arg = args.pop(0)
        if arg == "--mesh-shape" and args and args[0][:1] == "-" and args[0][1:2].isdigit():
            arg = f"--mesh-shape={args.pop(0)}"
        out.append(arg)
    return out
