"""Length buckets: a batch's padding trimmed to the smallest of a few widths that holds its longest prompt (and
response), so that short batches run short programs; each width compiles once.

Prompts are left-padded (their real tokens end at the last column) and responses right-padded, so trimming keeps
the last columns of a prompt and the first of a response; every real token keeps its place relative to the others
and its position id. With several processes, each reads only its rows: the widths are agreed on (the largest
needed anywhere) before the batch becomes a global array.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rlhf_jax.config import DataSection

SMALLEST_DEFAULT = 64  # narrower widths save less than the compile of another program costs


def widths(limit: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
    """The widths a dimension padded to `limit` may take: `buckets`, or powers of two from 64, and `limit`."""
    chosen = buckets or [1 << k for k in range(SMALLEST_DEFAULT.bit_length() - 1, limit.bit_length())]
    return tuple(sorted({w for w in chosen if w < limit} | {limit}))


def fit(needed: int, allowed: Sequence[int]) -> int:
    """The smallest allowed width that holds `needed` columns (allowed is increasing and ends at the limit)."""
    return next(w for w in allowed if w >= needed)


def _needed(mask: np.ndarray) -> int:
    """Real columns of a padded axis (the last): the most any row holds."""
    return int(mask.reshape(-1, mask.shape[-1]).sum(-1).max(initial=0))


SFT_COLUMNS = ("ids", "mask", "response_mask", "positions", "segment_ids")  # [prompt | response] in one row


class Trimmer:
    """Cuts a host's batch of the pipeline's layouts (prompts, rankings, unpacked sft) to its bucket widths.
    `agree` maps this host's needed (prompt, response) columns to every host's (`max_over_processes`)."""

    def __init__(self, spec: DataSection, agree: Callable[[np.ndarray], np.ndarray] = lambda needed: needed):
        self.P, self.pack, self.agree = spec.max_prompt_tokens, spec.pack, agree
        self.prompt_widths = widths(spec.max_prompt_tokens, spec.prompt_buckets)
        self.response_widths = widths(spec.max_response_tokens, spec.response_buckets)

    def __call__(self, batch: dict) -> dict:
        sft, P = "ids" in batch, self.P
        if sft and self.pack:  # packed rows have no padding worth trimming
            return batch
        if sft:
            needed = [_needed(batch["mask"][:, :P]), _needed(batch["mask"][:, P:])]
        else:
            needed = [_needed(batch["prompt_mask"]), _needed(batch["response_mask"]) if "response_mask" in batch else 0]
        p_needed, r_needed = self.agree(np.asarray(needed))
        Wp, Wr = fit(int(p_needed), self.prompt_widths), fit(int(r_needed), self.response_widths)

        def cut(key: str, x: np.ndarray) -> np.ndarray:
            if sft and key in SFT_COLUMNS:
                return x[:, P - Wp:P + Wr]
            if key.startswith("prompt_"):
                return x[..., P - Wp:]
            if key.startswith("response_"):
                return x[..., :Wr]
            return x

        return {key: cut(key, x) for key, x in batch.items()}
