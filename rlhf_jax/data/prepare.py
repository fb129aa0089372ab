"""Prepare a dataset: read and validate every row, then write TFDS array_record splits (no TensorFlow needed).

Layout: DATA_DIR/NAME/1.0.0/ with one array_record file per split and TFDS metadata; our own facts (kind,
source format, the largest K of a ranking set, counts) ride along in the dataset's metadata.json.
Nothing is written until every row has been read: a bad row (without --skip-invalid) leaves no files behind.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.formats import FORMATS, read_rows
from rlhf_jax.errors import UserError

VERSION = "1.0.0"
TRAIN, EVAL = "train", "eval"

FEATURES = {
    "sft": lambda: {"prompt": tfds.features.Text(), "response": tfds.features.Text(),
                    "metadata": tfds.features.Text()},
    "rankings": lambda: {"prompt": tfds.features.Text(), "responses": tfds.features.Sequence(tfds.features.Text()),
                         "ranks": tfds.features.Sequence(np.int32)},
    "prompts": lambda: {"prompt": tfds.features.Text(), "metadata": tfds.features.Text()},
}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes already-validated records; one subclass per dataset name (TFDS names datasets by class)."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, kind: str, splits: Mapping[str, list], metadata: dict, **kwargs):
        self._kind, self._splits, self._metadata = kind, splits, metadata
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=f"rlhf_jax {self._kind} dataset",
                                     features=tfds.features.FeaturesDict(FEATURES[self._kind]()),
                                     metadata=tfds.core.MetadataDict(self._metadata))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(rows) for name, rows in self._splits.items() if rows}

    def _generate_examples(self, rows):
        for i, row in enumerate(rows):
            yield i, row


def _is_eval(prompt: str, eval_fraction: float) -> bool:
    """Split by a hash of the prompt, so one prompt never lands in both splits and reruns agree."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def dataset_dir(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / name / VERSION


def prepare(fmt: str, inputs: Sequence[str], data_dir: str | Path, name: str, eval_fraction: float = 0.0,
            skip_invalid: bool = False, fields: Mapping[str, str] | None = None, overwrite: bool = False) -> dict:
    """Import `inputs` in format `fmt` as dataset `name`; returns the summary (examples per split, skips)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(f"dataset name {name!r} must be lower_snake_case (letters, digits, underscores)")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    out = dataset_dir(data_dir, name)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: dataset already prepared (pass --overwrite to replace it)")
    kind = FORMATS[fmt]

    splits: dict[str, list] = {TRAIN: [], EVAL: []}
    skipped: collections.Counter = collections.Counter()
    for row in read_rows(fmt, inputs, fields):
        if row.error is not None:
            if not skip_invalid:
                raise row.error
            skipped[row.error.reason] += 1
            continue
        splits[EVAL if _is_eval(row.record["prompt"], eval_fraction) else TRAIN].append(row.record)
    if not splits[TRAIN]:
        raise UserError(f"no valid training examples in {', '.join(map(str, inputs))} "
                        f"(skipped: {dict(skipped) or 'none'})")

    counts = {split: len(rows) for split, rows in splits.items() if rows}
    max_responses = max((len(r.get("responses", ())) for rows in splits.values() for r in rows), default=0)
    metadata = {"kind": kind, "format": fmt, "inputs": [str(p) for p in inputs], "examples": counts,
                "skipped": dict(skipped), "max_responses": max_responses}
    if out.exists():
        shutil.rmtree(out)
    builder_cls = type(f"Dataset_{name}", (_Builder,), {"name": name}, skip_registration=True)
    builder = builder_cls(kind=kind, splits=splits, metadata=metadata, data_dir=str(data_dir),
                          file_format="array_record")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is for our summary
        builder.download_and_prepare()
    return {"dataset": str(out), "kind": kind, "format": fmt, "examples": counts,
            "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
            **({"max_responses": max_responses} if kind == "rankings" else {})}


def quiet_tfds() -> None:
    """TFDS reports progress with bars and INFO logs; the CLI's stdout is its JSON summary alone."""
    import absl.logging

    tfds.disable_progress_bar()
    absl.logging.set_verbosity(absl.logging.WARNING)
