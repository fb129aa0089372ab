"""Importers from the dataset formats users have into three canonical record kinds, validating every row; this
package's registry maps each format name to its kind and to the converter of its module (`jsonl`: the generic
formats with renamable fields; `hh_rlhf`; `tldr`; `ultrafeedback`; `shp`).

Canonical records are plain dicts:
  sft       {"prompt": str, "response": str, "metadata": str}
  rankings  {"prompt": str, "responses": list[str], "ranks": list[int]}   ranks[i]: dense rank of responses[i], 0 = best
  prompts   {"prompt": str, "metadata": str}
metadata is a compact JSON string (sorted keys) of the row's "metadata" field, "" when there is none.

`read_rows` streams one `Row` per input row (JSONL, gzipped JSONL, JSON lines named .json, or Parquet, local or
http(s) URLs downloaded into a cache; `files`, `download`); an invalid row comes back as a `RowError` instead of
stopping the read, so callers can count and report skipped rows by `reason`, and a row accepted with a change (ranks
renumbered) carries `notes` for them to count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from rlhf_jax.data.formats import hh_rlhf, jsonl, shp, tldr, ultrafeedback
from rlhf_jax.data.formats.files import local_file, read_file
from rlhf_jax.data.formats.rows import Invalid, Row
from rlhf_jax.errors import UserError

KINDS = ("sft", "rankings", "prompts")

FORMATS: dict[str, str] = {
    "jsonl_sft": "sft",
    "jsonl_rankings": "rankings",
    "jsonl_prompts": "prompts",
    "hh_rlhf": "rankings",
    "hh_rlhf_sft": "sft",
    "hh_rlhf_prompts": "prompts",
    "tldr_sft": "sft",
    "tldr_comparisons": "rankings",
    "tldr_prompts": "prompts",
    "ultrafeedback": "rankings",
    "ultrafeedback_sft": "sft",
    "ultrafeedback_prompts": "prompts",
    "shp": "rankings",
}


def read_rows(fmt: str, paths: Sequence[str], fields: Mapping[str, str] | None = None,
              keys_seen: set[str] | None = None) -> Iterator[Row]:
    """One Row per input row of every file in order. Format, fields and files are checked before anything is read.
    `keys_seen` collects the fields rows hold (not null), for the caller to check its remapped fields against."""
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    names = _field_names(fmt, fields)
    convert = _converter(fmt, names)
    if fmt in jsonl.RENAMABLE:
        convert = _naming_fields(convert, names)
    if keys_seen is not None:
        convert = _noting_keys(convert, keys_seen)
    if isinstance(paths, (str, Path)):  # one path given bare would otherwise be read character by character
        paths = [paths]
    _refuse_repeats([str(p) for p in paths])
    files = [local_file(str(p)) for p in paths]
    return (row for path in files for row in read_file(path, convert))


def _noting_keys(convert: Callable[[dict, list], dict], keys_seen: set[str]) -> Callable[[dict, list], dict]:
    def noting(row, notes):
        if isinstance(row, dict):
            keys_seen.update(key for key, value in row.items() if value is not None)
        return convert(row, notes)
    return noting


def _naming_fields(convert: Callable[[dict, list], dict], names: dict[str, str]) -> Callable[[dict, list], dict]:
    """A field missing from a row of a format whose fields can be renamed says which fields the row has, and how
    the name was given: a misspelt --field, or rows that call the field otherwise."""
    renamed = {name: canonical for canonical, name in names.items() if name != canonical}

    def converting(row, notes):
        try:
            return convert(row, notes)
        except Invalid as e:
            if not e.missing or not isinstance(row, dict):
                raise
            keys = sorted(row)
            more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
            has = f"the row has {', '.join(map(repr, keys[:20]))}{more}" if keys else "the row is empty"
            if e.missing in renamed:
                problem = f"{e.problem} (--field {renamed[e.missing]}={e.missing}); {has}"
            else:
                problem = f"{e.problem}; {has} (--field {e.missing}=NAME reads it from another)"
            raise Invalid(e.reason, problem, e.missing) from None
    return converting


def _refuse_repeats(paths: list[str]) -> None:
    """Each input once: a file given twice would double every row (and every pair's weight in the loss)."""
    seen: dict[str, str] = {}
    for path in paths:
        key = path if path.startswith(("http://", "https://")) else str(Path(path).resolve())
        if key in seen:
            raise UserError(f"{path}: given twice as an input (also as {seen[key]!r}); each file is read once")
        seen[key] = path


def _field_names(fmt: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    """Canonical name -> the name in the user's rows."""
    renamable = jsonl.RENAMABLE.get(fmt, ())
    fields = dict(fields or {})
    if fields and not renamable:
        raise UserError(f"format {fmt!r} has fixed field names; "
                        f"field remapping only applies to {', '.join(jsonl.RENAMABLE)}")
    unknown = sorted(set(fields) - set(renamable))
    if unknown:
        raise UserError(f"format {fmt!r} has no field {unknown[0]!r} to remap; it has: {', '.join(renamable)}")
    names = {name: fields.get(name, name) for name in renamable}
    readers: dict[str, str] = {}
    for name, key in names.items():
        if key in readers:  # a prompt that is its own response would import without a word
            raise UserError(f"--field: {readers[key]} and {name} would both read the rows' {key!r}; map them to "
                            "different fields")
        readers[key] = name
    return names


def _converter(fmt: str, names: dict[str, str]) -> Callable[[dict, list], dict]:
    """(raw row, notes) -> canonical record; a converter appends to `notes` what it accepted but changed."""
    converters = {
        "jsonl_sft": lambda row, notes: jsonl.sft(row, names),
        "jsonl_rankings": lambda row, notes: jsonl.rankings(row, names, notes),
        "jsonl_prompts": lambda row, notes: jsonl.prompts(row, names),
        "hh_rlhf": lambda row, notes: hh_rlhf.rankings(row),
        "hh_rlhf_sft": lambda row, notes: hh_rlhf.sft(row),
        "hh_rlhf_prompts": lambda row, notes: hh_rlhf.prompts(row),
        "tldr_sft": lambda row, notes: tldr.sft(row),
        "tldr_comparisons": lambda row, notes: tldr.comparisons(row),
        "tldr_prompts": lambda row, notes: tldr.prompts(row),
        "ultrafeedback": lambda row, notes: ultrafeedback.rankings(row),
        "ultrafeedback_sft": lambda row, notes: ultrafeedback.sft(row),
        "ultrafeedback_prompts": lambda row, notes: ultrafeedback.prompts(row),
        "shp": lambda row, notes: shp.rankings(row),
    }
    return converters[fmt]
