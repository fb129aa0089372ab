"""One input row: the `Row` a reader yields (a canonical record, or the `RowError` that rejected it) and the field
checks every format's converter shares, which raise `Invalid` (the problem without the row's file:line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_jax.errors import UserError


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


class Invalid(Exception):
    """Raised by the row converters, which do not know the row's file:line; turned into a RowError."""

    def __init__(self, reason: str, problem: str, missing: str = ""):
        super().__init__(problem)
        self.reason = reason
        self.problem = problem
        self.missing = missing  # the row's own field whose absence this is, if any


def field(row: dict, name: str, prefix: str = "") -> Any:
    if name not in row:
        raise Invalid("missing_field", f"missing field '{prefix}{name}'", missing="" if prefix else name)
    return row[name]


def string(row: dict, name: str, prefix: str = "") -> str:
    value = field(row, name, prefix)
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"field '{prefix}{name}' must be a string, got {type_name(value)}")
    return value


def prompt(row: dict, name: str) -> str:
    prompt = string(row, name)
    if not prompt.strip():
        raise Invalid("empty_prompt", f"field {name!r} (the prompt) is empty")
    return prompt


def response(text: str, what: str) -> str:
    if not text.strip():
        raise Invalid("empty_response", f"{what} is empty")
    return text


def check_distinct(texts: list[str], name: str, subfield: str = "") -> None:
    """A response ranked against itself teaches nothing, and tied with itself it hides a labelling mistake."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in first:
            at = f".{subfield}" if subfield else ""
            raise Invalid("identical_responses",
                           f"field '{name}[{first[text]}]{at}' and '{name}[{i}]{at}' are identical")
        first[text] = i


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not ranks


def type_name(value: Any) -> str:
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
