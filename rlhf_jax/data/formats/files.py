"""Reading input files into raw rows: local paths or http(s) URLs (downloaded into the cache first), JSON lines
(plain, gzipped, or named .json) decoded line by line so one bad byte costs only its own row, and Parquet files
read in batches; every row converted by the format's converter into a `Row`."""

from __future__ import annotations

import gzip
import json
import urllib.parse
import zlib
from pathlib import Path
from typing import Callable, Iterator

from rlhf_jax.data.formats import download, rows
from rlhf_jax.errors import UserError, json_error

_BOM = "\ufeff"
_PARQUET_BATCH_ROWS = 1024


def local_file(path: str) -> Path:
    """The local file to read for `path`, downloading URLs into the cache first."""
    if path.startswith(("http://", "https://")):
        _checked_suffix(Path(urllib.parse.urlparse(path).path))  # before a download, not after
        return download.fetch(path, download.default_cache_dir())
    local = _checked_suffix(Path(path))
    if local.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
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


def read_file(path: Path, convert: Callable[[dict, list], dict]) -> Iterator[rows.Row]:
    source = _parquet_rows(path) if _file_type(path) == "parquet" else _json_lines(path)
    for n, raw in source:
        where = f"{path}:{n}"
        notes: list[str] = []
        try:
            obj = _parse_line(raw) if isinstance(raw, bytes) else raw
            yield rows.Row(convert(obj, notes), None, where, tuple(notes))
        except rows.Invalid as e:
            yield rows.Row(None, rows.RowError(where, e.reason, e.problem), where)


def _json_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a (gzipped) JSON-lines file; blank lines before the first row and after
    the last are dropped, blank lines between rows are bad rows."""
    opener = gzip.open if _file_type(path) == "gzip" else open
    try:
        with opener(path, "rb") as f:
            blank: list[tuple[int, bytes]] = []  # held back until we know whether they are trailing
            first = True
            for n, line in enumerate(f, 1):
                if not line.strip():
                    if not first:
                        blank.append((n, line))
                    continue
                if first and _is_json_array(line):
                    raise UserError(f"{path}: is a JSON array; expected JSON lines (one object per line)")
                if first and line.decode("utf-8", "replace").lstrip(_BOM).strip() == "{":
                    raise UserError(f"{path}: is one JSON object over several lines; expected JSON lines (one object "
                                    "per line)")
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
        raise rows.Invalid("invalid_utf8", f"not valid UTF-8 (byte {e.start} of the line)") from None
    if not text.strip():
        raise rows.Invalid("invalid_json", "blank line (expected a JSON object)")
    # A byte order mark (files saved by some editors) is not JSON; columns still count it, as in the raw line.
    bom = len(text) - len(text.lstrip(_BOM))
    try:
        # without its newline, which would put an error at the line's end at column 1 of a line after it
        obj = json.loads(text[bom:].rstrip("\r\n"), object_pairs_hook=_object_without_repeats,
                         parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise rows.Invalid("invalid_json", json_error(e, bom)) from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, arrays nested too deep
        raise rows.Invalid("invalid_json", f"invalid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(obj, dict):
        raise rows.Invalid("not_an_object", f"expected a JSON object, got {rows.type_name(obj)}")
    # A null is how a dataframe's export writes a field a row lacks: absent, as in a Parquet file.
    obj = {k: v for k, v in obj.items() if v is not None}
    for key, value in obj.items():  # JSON may escape half a UTF-16 pair ("\ud800"), which no UTF-8 text holds
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise rows.Invalid("invalid_utf8", f"field {key!r} holds a lone surrogate escape (\\ud800-\\udfff "
                                               "without its pair), not text") from None
    return obj


def _object_without_repeats(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a key given twice (which `json` would resolve silently, the last one winning) is refused."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        key = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise rows.Invalid("invalid_json", f"key {key!r} appears twice in one object")
    return obj


def _refuse_constant(name: str):
    raise rows.Invalid("invalid_json", f"{name} is not a JSON value")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based row index, row) of a Parquet file with the same field names as the JSONL formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        n = 0
        for batch in batches:
            for row in _batch_rows(path, batch, n):
                n += 1
                # A Parquet column exists for every row, so a null is how a row lacks that field.
                yield n, {k: v for k, v in row.items() if v is not None}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable Parquet file ({first_line})") from None


def _batch_rows(path: Path, batch, before: int) -> list[dict]:
    """A Parquet batch as Python rows; a value Python cannot hold (a timestamp past year 9999) is named by column."""
    try:
        return batch.to_pylist()
    except (OverflowError, ValueError):
        for name in batch.schema.names:
            try:
                batch.column(name).to_pylist()
            except (OverflowError, ValueError) as e:
                raise UserError(f"{path}: rows {before + 1}-{before + batch.num_rows}, column {name!r}: a value "
                                f"Python cannot hold ({e})") from None
        raise
