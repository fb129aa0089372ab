"""Importers from the dataset formats users have into three canonical record kinds, validating every row.

Canonical records are plain dicts:
  sft       {"prompt": str, "response": str, "metadata": str}
  rankings  {"prompt": str, "responses": list[str], "ranks": list[int]}   ranks[i]: dense rank of responses[i], 0 = best
  prompts   {"prompt": str, "metadata": str}
metadata is a compact JSON string (sorted keys) of the row's "metadata" field, "" when there is none.

`read_rows` streams one `Row` per input row (JSONL, gzipped JSONL, JSON lines named .json, or Parquet, local or
http(s) URLs downloaded into a cache); an invalid row comes back as a `RowError` instead of stopping the read, so
callers can count and report skipped rows by `reason`, and a row accepted with a change (ranks renumbered) carries
`notes` for them to count.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

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
}

# Canonical field names each generic format lets the user rename with `fields`.
_RENAMABLE = {
    "jsonl_sft": ("prompt", "response", "metadata"),
    "jsonl_rankings": ("prompt", "responses", "ranks", "chosen", "rejected"),
    "jsonl_prompts": ("prompt", "metadata"),
}

# Download locations, for users with network access; `read_rows` accepts these URLs directly.
_HH_RLHF_BASE = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_RLHF_URLS: dict[str, str] = {
    f"{subset}/{split}": f"{_HH_RLHF_BASE}/{subset}/{split}.jsonl.gz"
    for subset in ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
    for split in ("train", "test")
}
_OPENAI_SFF = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
TLDR_SFT_URLS: dict[str, str] = {
    split: f"{_OPENAI_SFF}/datasets/tldr_3_filtered/{split}.jsonl" for split in ("train", "valid", "test")
}
# The TL;DR comparison batches are batch3.json .. batch22.json (the other files there are CNN/DM comparisons).
TLDR_COMPARISONS_URL = _OPENAI_SFF + "/dataset/comparisons/batch{n}.json"
TLDR_COMPARISONS_BATCHES = range(3, 23)

_ASSISTANT = "\n\nAssistant:"
_BOM = "\ufeff"
_PARQUET_BATCH_ROWS = 1024


class RowError(UserError):
    """One invalid input row. str(e) is one line: '<file>:<line>: <problem>'."""

    def __init__(self, where: str, reason: str, problem: str):
        # Messages are printed one per line, so a stray newline must not split one.
        super().__init__(f"{where}: {problem}".replace("\n", "\\n"))
        self.where = where
        self.reason = reason  # short machine key for counting skipped rows
        self.problem = problem


@dataclass(frozen=True)
class Row:
    """One input row: either a canonical record or the error that rejected it."""

    record: dict | None
    error: RowError | None
    where: str  # "file:line"
    notes: tuple[str, ...] = ()  # what was accepted but changed, e.g. "non_dense_ranks", counted by prepare


class _Invalid(Exception):
    """Raised by the row converters, which do not know the row's file:line; turned into a RowError."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason
        self.problem = problem


# ---------------------------------------------------------------------------------------------------------------------
# Reading files


def read_rows(fmt: str, paths: Sequence[str], fields: Mapping[str, str] | None = None) -> Iterator[Row]:
    """One Row per input row of every file in order. Format, fields and files are checked before anything is read."""
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    convert = _converter(fmt, _field_names(fmt, fields))
    if isinstance(paths, (str, Path)):  # one path given bare would otherwise be read character by character
        paths = [paths]
    files = [_local_file(str(p)) for p in paths]
    return (row for path in files for row in _read_file(path, convert))


def _field_names(fmt: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    """Canonical name -> the name in the user's rows."""
    renamable = _RENAMABLE.get(fmt, ())
    fields = dict(fields or {})
    if fields and not renamable:
        raise UserError(f"format {fmt!r} has fixed field names; "
                        f"field remapping only applies to {', '.join(_RENAMABLE)}")
    unknown = sorted(set(fields) - set(renamable))
    if unknown:
        raise UserError(f"format {fmt!r} has no field {unknown[0]!r} to remap; it has: {', '.join(renamable)}")
    return {name: fields.get(name, name) for name in renamable}


def _local_file(path: str) -> Path:
    """The local file to read for `path`, downloading URLs into the cache first."""
    if path.startswith(("http://", "https://")):
        _checked_suffix(Path(urllib.parse.urlparse(path).path))  # before a download, not after
        return fetch(path, default_cache_dir())
    local = _checked_suffix(Path(path))
    if not local.is_file():
        raise UserError(f"{path}: file not found")
    return local


def _file_type(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "gzip"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    return None


def _checked_suffix(path: Path) -> Path:
    if _file_type(path) is None:
        raise UserError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .json.gz or .parquet)")
    return path


def _read_file(path: Path, convert: Callable[[dict, list], dict]) -> Iterator[Row]:
    source = _parquet_rows(path) if _file_type(path) == "parquet" else _json_lines(path)
    for n, raw in source:
        where = f"{path}:{n}"
        notes: list[str] = []
        try:
            obj = _parse_line(raw) if isinstance(raw, bytes) else raw
            yield Row(convert(obj, notes), None, where, tuple(notes))
        except _Invalid as e:
            yield Row(None, RowError(where, e.reason, e.problem), where)


def _json_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a (gzipped) JSON-lines file; blank lines at the very end are dropped."""
    opener = gzip.open if _file_type(path) == "gzip" else open
    try:
        with opener(path, "rb") as f:
            blank: list[tuple[int, bytes]] = []  # held back until we know whether they are trailing
            first = True
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank.append((n, line))
                    continue
                if first and _is_json_array(line):
                    raise UserError(f"{path}: is a JSON array; expected JSON lines (one object per line)")
                first = False
                yield from blank
                blank.clear()
                yield n, line
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None


def _is_json_array(first_line: bytes) -> bool:
    """Whether a file whose first non-blank line is `first_line` holds a JSON array rather than JSON lines: the
    line opens a list it does not close, or is a whole list of objects. (A list of anything else on the first line
    is a bad row of a JSON-lines file, reported as such.)"""
    text = first_line.decode("utf-8", "replace").lstrip(_BOM).strip()
    if not text.startswith("["):
        return False
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return True
    return bool(value) and all(isinstance(v, dict) for v in value)


def _parse_line(line: bytes) -> dict:
    # Decoding per line keeps one bad byte from costing more than its own row.
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid("invalid_utf8", f"not valid UTF-8 (byte {e.start} of the line)") from None
    if not text.strip():
        raise _Invalid("invalid_json", "blank line (expected a JSON object)")
    # A byte order mark (files saved by some editors) is not JSON; columns still count it, as in the raw line.
    bom = len(text) - len(text.lstrip(_BOM))
    try:
        obj = json.loads(text[bom:])
    except json.JSONDecodeError as e:
        raise _Invalid("invalid_json", f"invalid JSON ({e.msg} at column {bom + e.colno})") from None
    if not isinstance(obj, dict):
        raise _Invalid("not_an_object", f"expected a JSON object, got {_type_name(obj)}")
    return obj


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based row index, row) of a Parquet file with the same field names as the JSONL formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                # A Parquet column exists for every row, so a null is how a row lacks that field.
                yield n, {k: v for k, v in row.items() if v is not None}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable Parquet file ({first_line})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Downloads


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHF_JAX_CACHE") or Path.home() / ".cache" / "rlhf_jax" / "downloads")


def fetch(url: str, cache_dir: str | Path) -> Path:
    """The local copy of `url` in `cache_dir`, downloaded once; a partial download never looks complete."""
    cache_dir = Path(cache_dir)
    url_path = urllib.parse.urlparse(url).path
    # Different URLs share file names (every HH-RLHF subset has a train.jsonl.gz), so the name carries a URL hash.
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{Path(url_path).name or 'download'}"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(f"{url}: download failed ({reason})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Row converters: raw JSON object -> canonical record


def _converter(fmt: str, names: dict[str, str]) -> Callable[[dict, list], dict]:
    """(raw row, notes) -> canonical record; a converter appends to `notes` what it accepted but changed."""
    converters = {
        "jsonl_sft": lambda row, notes: _generic_sft(row, names),
        "jsonl_rankings": lambda row, notes: _generic_rankings(row, names, notes),
        "jsonl_prompts": lambda row, notes: _generic_prompt(row, names),
        "hh_rlhf": lambda row, notes: _hh_rlhf(row),
        "hh_rlhf_sft": lambda row, notes: _hh_rlhf_sft(row),
        "hh_rlhf_prompts": lambda row, notes: _hh_rlhf_prompt(row),
        "tldr_sft": lambda row, notes: _tldr_sft(row),
        "tldr_comparisons": lambda row, notes: _tldr_comparison(row),
        "tldr_prompts": lambda row, notes: {"prompt": _tldr_prompt(row, ""), "metadata": ""},
    }
    return converters[fmt]


def _generic_sft(row: dict, names: dict[str, str]) -> dict:
    prompt = _prompt(row, names["prompt"])
    response = _response(_string(row, names["response"]), f"field {names['response']!r}")
    return {"prompt": prompt, "response": response, "metadata": _metadata(row, names["metadata"])}


def _generic_prompt(row: dict, names: dict[str, str]) -> dict:
    return {"prompt": _prompt(row, names["prompt"]), "metadata": _metadata(row, names["metadata"])}


def _generic_rankings(row: dict, names: dict[str, str], notes: list[str]) -> dict:
    prompt = _prompt(row, names["prompt"])
    has_pair = names["chosen"] in row or names["rejected"] in row
    if names["responses"] not in row and has_pair:
        return _pairwise(prompt, row, names["chosen"], names["rejected"])
    if names["responses"] not in row:
        raise _Invalid("missing_field", f"missing field {names['responses']!r} "
                                        f"(or a {names['chosen']!r}/{names['rejected']!r} pair)")
    responses = _responses(row, names["responses"])
    ranks = _int_list(row, names["ranks"])
    dense = _dense_ranks(ranks, len(responses), names["ranks"])
    if dense != ranks:
        notes.append("non_dense_ranks")  # accepted, but the user may not have meant gaps or an offset
    return {"prompt": prompt, "responses": responses, "ranks": dense}


def _pairwise(prompt: str, row: dict, chosen_name: str, rejected_name: str) -> dict:
    chosen = _response(_string(row, chosen_name), f"field {chosen_name!r}")
    rejected = _response(_string(row, rejected_name), f"field {rejected_name!r}")
    if chosen == rejected:
        raise _Invalid("identical_responses", f"fields {chosen_name!r} and {rejected_name!r} are identical")
    return {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}


def _hh_prompt(chosen: str) -> str:
    """The dialogue of an HH-RLHF text up to and including its last "\\n\\nAssistant:"."""
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise _Invalid("missing_field", "field 'chosen' has no Assistant turn ('\\n\\nAssistant:')")
    return chosen[: cut + len(_ASSISTANT)]


def _hh_rlhf(row: dict) -> dict:
    """HH-RLHF: both texts are the whole dialogue; the prompt is everything up to the chosen text's last turn."""
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    prompt = _hh_prompt(chosen)
    if not rejected.startswith(prompt):
        raise _Invalid("prefix_mismatch", "field 'rejected' does not start with the same dialogue as 'chosen' "
                                          "(up to its last Assistant turn)")
    responses = [_response(chosen[len(prompt):], "the chosen Assistant reply"),
                 _response(rejected[len(prompt):], "the rejected Assistant reply")]
    if responses[0] == responses[1]:
        raise _Invalid("identical_responses", "fields 'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "responses": responses, "ranks": [0, 1]}


def _hh_rlhf_sft(row: dict) -> dict:
    """HH-RLHF as demonstrations: the prompt `hh_rlhf` builds and the chosen Assistant reply ('rejected' unread)."""
    chosen = _string(row, "chosen")
    prompt = _hh_prompt(chosen)
    return {"prompt": prompt, "response": _response(chosen[len(prompt):], "the chosen Assistant reply"),
            "metadata": ""}


def _hh_rlhf_prompt(row: dict) -> dict:
    """HH-RLHF as prompts: the dialogue up to the chosen text's last Assistant turn, the prompt `hh_rlhf` builds."""
    return {"prompt": _hh_prompt(_string(row, "chosen")), "metadata": ""}


def tldr_query(subreddit: str, title: str, post: str) -> str:
    """The TL;DR summarisation prompt, as in OpenAI's summarize-from-feedback."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post.strip()}\n\nTL;DR:"


def _tldr_prompt(info: dict, prefix: str) -> str:
    # Some rows have no subreddit (null or absent); the query then reads "r/".
    subreddit = info.get("subreddit")
    if subreddit is not None and not isinstance(subreddit, str):
        raise _Invalid("wrong_type", f"field '{prefix}subreddit' must be a string or null, got {_type_name(subreddit)}")
    title, post = _string(info, "title", prefix), _string(info, "post", prefix)
    return tldr_query(subreddit or "", title, post)


def _tldr_sft(row: dict) -> dict:
    prompt = _tldr_prompt(row, "")
    summary = _response(_string(row, "summary"), "field 'summary'")
    return {"prompt": prompt, "response": " " + summary.strip(), "metadata": ""}


def _tldr_comparison(row: dict) -> dict:
    """One labelled comparison: the chosen summary first (rank 0), the others after it, tied at rank 1."""
    info = _field(row, "info")
    if not isinstance(info, dict):
        raise _Invalid("wrong_type", f"field 'info' must be an object, got {_type_name(info)}")
    prompt = _tldr_prompt(info, "info.")
    summaries = _field(row, "summaries")
    if not isinstance(summaries, list):
        raise _Invalid("wrong_type", f"field 'summaries' must be a list of 2 objects, got {_type_name(summaries)}")
    if len(summaries) < 2:
        raise _Invalid("too_few_responses", f"field 'summaries' must be a list of 2 objects, got {len(summaries)}")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise _Invalid("wrong_type", f"field 'summaries[{i}]' must be an object, got {_type_name(summary)}")
        text = _response(_string(summary, "text", f"summaries[{i}]."), f"field 'summaries[{i}].text'")
        texts.append(" " + text.strip())
    _check_distinct(texts, "summaries", "text")
    choice = _field(row, "choice")
    if not _is_int(choice):
        raise _Invalid("wrong_type", f"field 'choice' must be an integer, got {_type_name(choice)}")
    if not 0 <= choice < len(texts):
        raise _Invalid("invalid_choice", f"field 'choice' must be 0..{len(texts) - 1}, got {choice}")
    responses = [texts[choice]] + texts[:choice] + texts[choice + 1:]
    return {"prompt": prompt, "responses": responses, "ranks": [0] + [1] * (len(texts) - 1)}


# ---------------------------------------------------------------------------------------------------------------------
# Field checks shared by the converters


def _field(row: dict, name: str, prefix: str = "") -> Any:
    if name not in row:
        raise _Invalid("missing_field", f"missing field '{prefix}{name}'")
    return row[name]


def _string(row: dict, name: str, prefix: str = "") -> str:
    value = _field(row, name, prefix)
    if not isinstance(value, str):
        raise _Invalid("wrong_type", f"field '{prefix}{name}' must be a string, got {_type_name(value)}")
    return value


def _prompt(row: dict, name: str) -> str:
    prompt = _string(row, name)
    if not prompt.strip():
        raise _Invalid("empty_prompt", f"field {name!r} (the prompt) is empty")
    return prompt


def _response(text: str, what: str) -> str:
    if not text.strip():
        raise _Invalid("empty_response", f"{what} is empty")
    return text


def _responses(row: dict, name: str) -> list[str]:
    responses = _field(row, name)
    expected = f"field {name!r} must be a list of at least 2 strings"
    if not isinstance(responses, list):
        raise _Invalid("wrong_type", f"{expected}, got {_type_name(responses)}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise _Invalid("wrong_type", f"field '{name}[{i}]' must be a string, got {_type_name(response)}")
        _response(response, f"field '{name}[{i}]'")
    if len(responses) < 2:
        raise _Invalid("too_few_responses", f"{expected}, got {len(responses)}")
    _check_distinct(responses, name)
    return responses


def _check_distinct(texts: list[str], name: str, subfield: str = "") -> None:
    """A response ranked against itself teaches nothing, and tied with itself it hides a labelling mistake."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in first:
            at = f".{subfield}" if subfield else ""
            raise _Invalid("identical_responses",
                           f"field '{name}[{first[text]}]{at}' and '{name}[{i}]{at}' are identical")
        first[text] = i


def _int_list(row: dict, name: str) -> list[int]:
    values = _field(row, name)
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        got = _type_name(values) if not isinstance(values, list) else "a list with a non-integer"
        raise _Invalid("wrong_type", f"field {name!r} must be a list of integers, got {got}")
    return values


def _dense_ranks(ranks: list[int], n_responses: int, name: str) -> list[int]:
    """Ranks renumbered 0, 1, 2, ... in order, ties kept: [2, 1, 1] -> [1, 0, 0]. A rank outside [0, K) is
    refused: K responses have at most K places, so it is a mistake (1-based ranks, a score, another row's)."""
    if len(ranks) != n_responses:
        raise _Invalid("invalid_ranks", f"field {name!r} must have one rank per response ({n_responses}), "
                                        f"got {len(ranks)}")
    outside = [r for r in ranks if not 0 <= r < n_responses]
    if outside:
        raise _Invalid("invalid_ranks", f"field {name!r} must hold ranks in [0, {n_responses}) for its "
                                        f"{n_responses} responses (0 = best), got {outside[0]}")
    levels = sorted(set(ranks))
    if len(levels) < 2:
        raise _Invalid("invalid_ranks", f"field {name!r} ties every response, so there is no preference to learn")
    dense = {rank: i for i, rank in enumerate(levels)}
    return [dense[r] for r in ranks]


def _metadata(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    # default=str: Parquet rows can hold dates and bytes, which JSON has no type for.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not ranks


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
