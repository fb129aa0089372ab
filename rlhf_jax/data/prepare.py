"""Prepare a dataset: read and validate every row, then write TFDS array_record splits (no TensorFlow needed).

Layout: DATA_DIR/NAME/1.0.0/ with one array_record file per split and TFDS metadata; our own facts (kind,
source format, the largest K of a ranking set, counts) ride along in the dataset's metadata.json.
Nothing is written until every row has been read: a bad row (without --skip-invalid) leaves no files behind. The
dataset is built beside DATA_DIR/NAME and renamed into place only once complete, so a failed run (a full disk, an
interrupt) leaves no half-written dataset, and --overwrite keeps the old one intact and readable until then.

Rankings are stored one element per prompt, as InstructGPT trains them: the rows of a prompt (HH-RLHF and TL;DR
hold several pairwise comparisons of one prompt as separate rows) become its unique responses and the list of
(better, worse) pairs among them; a K-way ranking row is all its ordered pairs, ties dropped.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.formats import FORMATS, read_rows
from rlhf_jax.data.formats.jsonl import RENAMABLE
from rlhf_jax.data.rankings import pairs_from_ranks
from rlhf_jax.errors import UserError
from rlhf_jax.runtime import fsio

VERSION = "1.0.0"
TRAIN, EVAL = "train", "eval"

FEATURES = {
    "sft": lambda: {"prompt": tfds.features.Text(), "response": tfds.features.Text(),
                    "metadata": tfds.features.Text()},
    # responses[better[n]] was preferred to responses[worse[n]]; responses are the prompt's unique ones, ended[k]
    # false where response k was cut before its end (a dataset prepared without the feature: every one ended).
    "rankings": lambda: {"prompt": tfds.features.Text(), "responses": tfds.features.Sequence(tfds.features.Text()),
                         "ended": tfds.features.Sequence(np.bool_),
                         "better": tfds.features.Sequence(np.int32), "worse": tfds.features.Sequence(np.int32)},
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

    # TFDS announces the start and end of a build with its path: the temporary one here; the CLI's summary names
    # the dataset, and a failed build then ends in its one error line.
    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass


# metadata "rankings_layout": the pipeline refuses rankings prepared before they were grouped by prompt.
RANKINGS_LAYOUT = "pairs"


def group_comparisons(records: Iterable[dict]) -> tuple[list[dict], dict]:
    """Canonical ranking records -> (one element per prompt and labeler, counts), so that all the comparisons of
    one labeler's ranking train as one batch element, as InstructGPT's do: rows without a "labeler" (pairwise
    datasets such as HH-RLHF and TL;DR, one comparison per row) are grouped by prompt alone, and several labelers'
    rankings of one prompt stay separate elements. An element is {"prompt", "responses" (unique, first-seen
    order), "ended" (of each response; a text seen both cut and ended is two responses), "better", "worse"}.
    Repeated pairs are kept, and so are inconsistent ones (A > B and B > A); an element left without pairs is
    left out. Nothing is dropped uncounted. (A row with two identical responses never gets here: the importers
    refuse it, or skip and count it as `identical_responses`.)"""
    groups: dict[tuple, dict] = {}
    index: dict[tuple, dict[tuple[str, bool], int]] = {}  # per element: (text, ended) -> position in "responses"
    rows = 0
    for record in records:
        rows += 1
        texts = record["responses"]
        responses = list(zip(texts, record.get("ended", [True] * len(texts))))
        pairs = _rank_pairs(tuple(record["ranks"]))
        key = (record["prompt"], record.get("labeler"))
        if key not in groups:
            groups[key] = {"prompt": record["prompt"], "responses": [], "ended": [], "better": [], "worse": []}
            index[key] = {}
        group, slots = groups[key], index[key]
        for i in sorted({i for pair in pairs for i in pair}):  # responses in no pair take no slot
            if responses[i] not in slots:
                slots[responses[i]] = len(group["responses"])
                group["responses"].append(texts[i])
                group["ended"].append(responses[i][1])
        group["better"] += [slots[responses[b]] for b, _ in pairs]
        group["worse"] += [slots[responses[w]] for _, w in pairs]
    out = [g for g in groups.values() if g["better"]]
    prompts = {g["prompt"] for g in out}
    return out, {"rows": rows, "prompts": len(prompts), "pairs": sum(len(g["better"]) for g in out),
                 "inconsistent_pairs": sum(_inconsistent_pairs(g["better"], g["worse"]) for g in out),
                 "cut_responses": sum(not ended for g in out for ended in g["ended"]),
                 "prompts_without_pairs": len({prompt for prompt, _ in groups} - prompts)}


@functools.lru_cache(maxsize=4096)
def _rank_pairs(ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """pairs_from_ranks as (better, worse) tuples, cached: rows share a few rankings ([0, 1] for every pair)."""
    better, worse = pairs_from_ranks(ranks)
    return tuple(zip(better.tolist(), worse.tolist()))


def _inconsistent_pairs(better: Sequence[int], worse: Sequence[int]) -> int:
    """Unordered response pairs compared both ways (A > B and B > A) within one element."""
    seen = set(zip(better, worse))
    return sum(1 for b, w in seen if b < w and (w, b) in seen)


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """Split by a hash of the prompt, so one prompt never lands in both splits and reruns agree."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


NAME_MAX = 100


def check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(f"dataset name {name!r} must be lower_snake_case (letters, digits, underscores)")
    if len(name) > NAME_MAX:  # a directory name, with room for the temporary one's suffix beside it
        raise UserError(f"dataset name {name[:20]}... has {len(name)} characters; at most {NAME_MAX}")


def dataset_dir(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / name / VERSION


def prepare(fmt: str, inputs: Sequence[str], data_dir: str | Path, name: str, eval_fraction: float = 0.0,
            skip_invalid: bool = False, fields: Mapping[str, str] | None = None, overwrite: bool = False,
            extra_metadata: Mapping | None = None, eval_prompts: Collection[str] | None = None) -> dict:
    """Import `inputs` in format `fmt` as dataset `name`; returns the summary (examples per split, skips, and for
    rankings the counts of `group_comparisons`: rows, prompts, pairs, inconsistent pairs, prompts without pairs).
    `extra_metadata` is stored with the dataset's metadata (e.g. the labeler's accuracy ceiling). With
    `eval_prompts`, exactly the rows of those prompts are held out (instead of a hash of each prompt)."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)  # one path, not its characters
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    check_name(name)
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    out = dataset_dir(data_dir, name)
    _check_target(Path(data_dir), name, overwrite, inputs)
    kind = FORMATS[fmt]

    splits: dict[str, list] = {TRAIN: [], EVAL: []}
    skipped: collections.Counter = collections.Counter()
    noted: collections.Counter = collections.Counter()  # rows accepted with a change, e.g. ranks renumbered
    keys_seen: set[str] = set()
    for row in read_rows(fmt, inputs, fields, keys_seen):
        if row.error is not None:
            if not skip_invalid:
                raise row.error
            skipped[row.error.reason] += 1
            continue
        noted.update(row.notes)
        prompt = row.record["prompt"]
        held_out = prompt in eval_prompts if eval_prompts is not None else is_eval_prompt(prompt, eval_fraction)
        splits[EVAL if held_out else TRAIN].append(row.record)
    _check_remapped(fields or {}, keys_seen, inputs)
    grouping: dict = {}
    if kind == "rankings":  # per split: the hash split already keeps each prompt in one of them
        splits, grouping = _group_splits(splits)
        grouping["non_dense_ranks"] = noted["non_dense_ranks"]  # rows whose ranks were renumbered 0, 1, 2, ...
        grouping["metadata_not_kept"] = noted["metadata_not_kept"]  # rows whose metadata field was left out
    if not splits[TRAIN] and splits[EVAL]:
        raise UserError(f"every valid example of {', '.join(map(str, inputs))} fell into the eval split "
                        f"({len(splits[EVAL])} examples); lower the eval fraction or give more prompts")
    if not splits[TRAIN]:
        without = f"; prompts without pairs: {grouping['prompts_without_pairs']}" if grouping else ""
        raise UserError(f"no valid training examples in {', '.join(map(str, inputs))} "
                        f"(skipped: {dict(skipped) or 'none'}{without})")

    counts = {split: len(rows) for split, rows in splits.items() if rows}
    if kind in ("sft", "prompts"):
        unread = _unread_fields(fmt, fields or {}, keys_seen) if kind == "prompts" else []
        grouping["without_metadata"] = _count_without_metadata(splits, (fields or {}).get("metadata", "metadata"),
                                                               unread)
    if kind == "prompts":
        grouping["repeated_prompts"] = _count_repeated_prompts(splits)
    max_responses = max((len(r.get("responses", ())) for rows in splits.values() for r in rows), default=0)
    metadata = {"kind": kind, "format": fmt, "inputs": [str(p) for p in inputs], "examples": counts,
                "skipped": dict(skipped), "max_responses": max_responses,
                **({"rankings_layout": RANKINGS_LAYOUT} if kind == "rankings" else {}), **grouping,
                **(extra_metadata or {})}
    _write(Path(data_dir), name, kind, splits, metadata, overwrite, inputs)
    return {"dataset": str(out), "kind": kind, "format": fmt, "examples": counts,
            "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
            **({"max_responses": max_responses} if kind == "rankings" else {}), **grouping}


def _count_without_metadata(splits: Mapping[str, list], field: str, unread: Sequence[str]) -> int:
    """Examples without metadata; where only some have it (a verifier's reference answer missing from a few rows,
    which its reward function then gets as None), one warning line says how many. Where none has it but the rows
    hold fields that were not imported (`unread`: {"question", "answer"} read with --field prompt=question), one
    warning line names them: the answer a verifier needs is likely among them."""
    rows = [r for split in splits.values() for r in split]
    without = sum(not r["metadata"] for r in rows)
    if 0 < without < len(rows):
        print(f"warning: {without} of {len(rows)} examples have no {field!r} field (metadata): a reward function or "
              "gold scorer gets None as their metadata", file=sys.stderr)
    elif rows and without == len(rows) and unread:
        more = f" and {len(unread) - 10} more" if len(unread) > 10 else ""
        print(f"warning: no example has a {field!r} field (metadata), and the rows' fields "
              f"{', '.join(map(repr, unread[:10]))}{more} were not imported: --field metadata={unread[0]} keeps one "
              "as each prompt's metadata, what a reward function or gold scorer gets (else None)", file=sys.stderr)
    return without


def _count_repeated_prompts(splits: Mapping[str, list]) -> int:
    """Rows whose prompt an earlier row has (kept: each is sampled as often as it appears); where copies carry other
    metadata (two reference answers), one warning line: a reward function checks each copy against its own."""
    metadata_of: dict[str, set[str]] = collections.defaultdict(set)
    repeated = 0
    for rows in splits.values():
        for row in rows:
            repeated += row["prompt"] in metadata_of
            metadata_of[row["prompt"]].add(row["metadata"])
    conflicting = [prompt for prompt, metadata in metadata_of.items() if len(metadata) > 1]
    if conflicting:
        print(f"warning: {len(conflicting)} prompts appear more than once with different metadata (the first: "
              f"{conflicting[0][:80]!r}): a reward function or gold scorer checks each copy against its own",
              file=sys.stderr)
    return repeated


def _unread_fields(fmt: str, fields: Mapping[str, str], keys_seen: set[str]) -> list[str]:
    """The fields rows of a format with renamable fields hold that the import does not read."""
    if fmt not in RENAMABLE:
        return []
    return sorted(keys_seen - {fields.get(canonical, canonical) for canonical in RENAMABLE[fmt]})


def _check_remapped(fields: Mapping[str, str], keys_seen: set[str], inputs: Sequence[str]) -> None:
    """A field the user named (--field metadata=answer) that no row holds is a misspelt or misremembered name: an
    optional field (metadata) would otherwise be imported as absent from every row without a word."""
    for canonical, name in fields.items():
        if name not in keys_seen:
            raise UserError(f"--field {canonical}={name}: no row of {', '.join(map(str, inputs))} has a field "
                            f"{name!r}; its rows have: {', '.join(sorted(keys_seen)[:20]) or 'none'}")


def _check_target(data_dir: Path, name: str, overwrite: bool, inputs: Sequence[str]) -> None:
    """Refuse, before any row is read, a --data-dir that is no directory and a dataset directory that cannot be
    replaced whole (present without --overwrite, a file, or holding an input)."""
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir}: is a file; --data-dir must be a directory")
    out = dataset_dir(data_dir, name)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: dataset already prepared (pass --overwrite to replace it)")
    fsio.check_out_dir(data_dir / name, overwrite, _local(inputs))


def _local(inputs: Sequence[str]) -> list[str]:
    return [str(p) for p in inputs if not str(p).startswith(("http://", "https://"))]


def _write(data_dir: Path, name: str, kind: str, splits: Mapping[str, list], metadata: dict, overwrite: bool,
           inputs: Sequence[str]) -> None:
    """Build DATA_DIR/NAME beside it and swap it in whole (fsio.replace_dir); a failure (full disk, no permission)
    is one line with the OS reason, and leaves neither a partial dataset nor a --data-dir of ours behind (the
    directories replace_dir created are removed)."""
    with fsio.replace_dir(data_dir / name, overwrite, _local(inputs)) as tmp:
        # TFDS writes <its data_dir>/<name>/<version> (and a downloads/ dir); build in tmp, keep the version.
        build = tmp / "build"
        builder_cls = type(f"Dataset_{name}", (_Builder,), {"name": name}, skip_registration=True)
        builder = builder_cls(kind=kind, splits=splits, metadata=metadata, data_dir=str(build),
                              file_format="array_record")
        with contextlib.redirect_stdout(sys.stderr), _deterministic_examples():  # stdout is for our summary
            builder.download_and_prepare()
        os.rename(build / name / VERSION, tmp / VERSION)
        shutil.rmtree(build)


@contextlib.contextmanager
def _deterministic_examples():
    """TFDS serializes each example as a tf.train.Example with protobuf's defaults, which write its features (a
    map) in an order that differs from one process to the next: the same rows prepared again made other files, and
    a run on the dataset no longer resumed (it fingerprints the dataset's files). Deterministic serialization
    writes the same bytes every time, and reads back the same."""
    serializer = tfds.core.example_serializer.ExampleSerializer
    original = serializer.serialize_example
    serializer.serialize_example = lambda self, example: self.get_tf_example(example).SerializeToString(
        deterministic=True)
    try:
        yield
    finally:
        serializer.serialize_example = original


def _group_splits(splits: Mapping[str, list]) -> tuple[dict[str, list], dict]:
    """group_comparisons of every split, and its counts summed over the splits."""
    grouped, totals = {}, dict.fromkeys(group_comparisons([])[1], 0)
    for split, records in splits.items():
        grouped[split], stats = group_comparisons(records)
        totals = {key: totals[key] + stats[key] for key in totals}
    return grouped, totals


def quiet_tfds() -> None:
    """TFDS reports progress with bars and INFO logs; the CLI's stdout is its JSON summary alone."""
    import absl.logging

    tfds.disable_progress_bar()
    absl.logging.set_verbosity(absl.logging.WARNING)
