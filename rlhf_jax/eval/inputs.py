"""What an evaluation reads besides the models: its prompts (a prompt file or a prepared prompts dataset's split),
prepared datasets named DIR[:SPLIT], and the user's gold scorer (MODULE:FUNCTION) with its scores checked."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_jax.data.pipeline import open_split, stored_metadata, stored_prompts
from rlhf_jax.data.prepare import VERSION
from rlhf_jax.errors import UserError
from rlhf_jax.models.generation import read_prompt_rows
from rlhf_jax.runtime import plugins as imports


def split_spec(text: str) -> tuple[Path, str]:
    """DIR[:SPLIT] of a prepared dataset (default split eval)."""
    path, _, split = text.rpartition(":") if ":" in Path(text).name else (text, "", "")
    return Path(path), split or "eval"


def load_prompts(text: str, limit: int = 0) -> tuple[list[str], list]:
    """(prompts, the metadata of each) of a prompt file (a .jsonl row's "metadata", else None), or of a prepared
    prompts dataset's split, in stored order."""
    path, split = (Path(text), "") if Path(text).is_file() else split_spec(text)  # a file's name may hold a ":"
    if path.is_file():
        prompts, metadata = read_prompt_rows(path)
        return (prompts[:limit], metadata[:limit]) if limit else (prompts, metadata)
    source, metadata = open_dataset(path, split, "eval.prompts")
    if metadata["kind"] != "prompts":
        raise UserError(f"eval.prompts={text}: a {metadata['kind']!r} dataset, expected one of kind 'prompts'")
    return stored_prompts(source, limit), stored_metadata(source, limit)


def open_dataset(path: Path, split: str, key: str):
    if not (path / VERSION / "dataset_info.json").exists():
        raise UserError(f"{key}={path}: neither a prompt file nor a prepared dataset directory "
                        "(python -m rlhf_jax.data ... --data-dir DIR --name NAME makes DIR/NAME)")
    try:
        return open_split(path.parent, path.name, split)
    except UserError as e:  # e.g. no such split: named as given
        raise UserError(f"{key}={path}:{split}: {e}") from None


def load_gold(spec: str) -> Callable | None:
    """MODULE:FUNCTION: f(prompts, responses) -> one score per response, offered `ended` and `metadata`."""
    if not spec:
        return None
    fn = imports.function(spec, "eval.gold")[0]
    imports.check_signature(fn, f"eval.gold={spec}", ("prompts", "responses"), imports.SCORER_KEYWORDS)
    return fn


def gold_scores(fn: Callable, spec: str, prompts: list[str], responses: list[str], ended: list[bool],
                metadata: list) -> np.ndarray:
    """One finite score per response from the user's scorer (told which responses ended and the prompts' metadata
    where it takes those keywords); anything else (an exception, None, strings, the wrong count, NaN) is one line
    naming the scorer and what it returned."""
    returned = imports.call(fn, f"eval.gold={spec}", list(prompts), list(responses),
                            **dict(zip(imports.SCORER_KEYWORDS, (list(ended), list(metadata)))))
    return imports.scores(returned, len(responses), f"eval.gold={spec}")
