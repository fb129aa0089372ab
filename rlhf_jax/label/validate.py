"""The checks of every request body, before anything is written: a ranking is a full ordering of exactly its
prompt's response ids, ratings 1-7 and known flags of those responses only, from a named labeler. A failed check
is an ApiError whose message names the field and what is wrong with it."""

from __future__ import annotations

import math

from rlhf_jax.label.store import Prompt, Ranking

FLAGS = ("fails_instruction", "hallucination", "harmful", "other")
RATINGS = range(1, 8)
MAX_NAME = 64


class ApiError(Exception):
    """A request refused: its HTTP status and the problem in one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def labeler_name(value) -> str:
    """A labeler's name: 1 to MAX_NAME printable characters, surrounding spaces dropped."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "labeler: expected a non-empty name")
    name = value.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise ApiError(422, f"labeler: expected at most {MAX_NAME} printable characters")
    return name


def ranking(body, prompts: dict[int, Prompt]) -> Ranking:
    """The ranking a POST /api/rankings body describes."""
    _fields(body, required=("labeler", "prompt_id", "order"), optional=("ratings", "flags", "seconds"))
    labeler = labeler_name(body["labeler"])
    prompt = _prompt(body["prompt_id"], prompts)
    ids = [r.id for r in prompt.responses]
    levels = _order(body["order"], ids, prompt.id)
    ratings = {rid: _rating(value, rid) for rid, value in _by_response(body.get("ratings", {}), "ratings", ids)}
    flags = {rid: _flags(value, rid) for rid, value in _by_response(body.get("flags", {}), "flags", ids)}
    return Ranking(labeler, prompt.id, levels, ratings, {rid: f for rid, f in flags.items() if f},
                   _seconds(body.get("seconds")))


def skip(body, prompts: dict[int, Prompt]) -> tuple[str, int]:
    """(labeler, prompt id) of a POST /api/skip body."""
    _fields(body, required=("labeler", "prompt_id"), optional=())
    return labeler_name(body["labeler"]), _prompt(body["prompt_id"], prompts).id


def _fields(body, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}; expected {', '.join(required + optional)}")
    missing = [k for k in required if k not in body]
    if missing:
        raise ApiError(422, f"missing field {missing[0]!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(value, prompts: dict[int, Prompt]) -> Prompt:
    if not _is_int(value):
        raise ApiError(422, f"prompt_id: expected an integer, got {value!r}")
    if value not in prompts:
        raise ApiError(422, f"prompt_id: unknown prompt {value}")
    return prompts[value]


def _order(value, ids: list[int], prompt_id: int) -> tuple[tuple[int, ...], ...]:
    """Levels best first, every response id of the prompt exactly once, at least two levels."""
    if not isinstance(value, list) or not all(isinstance(level, list) and level for level in value):
        raise ApiError(422, "order: expected a list of levels, each a non-empty list of response ids")
    seen: set[int] = set()
    for rid in (rid for level in value for rid in level):
        if not _is_int(rid) or rid not in ids:
            raise ApiError(422, f"order: {rid!r} is not a response id of prompt {prompt_id}")
        if rid in seen:
            raise ApiError(422, f"order: response {rid} appears more than once")
        seen.add(rid)
    missing = [rid for rid in ids if rid not in seen]
    if missing:
        raise ApiError(422, f"order: response {missing[0]} is missing (every response of prompt {prompt_id} "
                            "must be placed once)")
    if len(value) < 2:
        raise ApiError(422, "order: every response is on one level, which states no preference; skip the prompt "
                            "instead")
    return tuple(tuple(level) for level in value)


def _by_response(value, field: str, ids: list[int]):
    """(response id, value) of a {response id: value} object; its keys must be the prompt's response ids."""
    if not isinstance(value, dict):
        raise ApiError(422, f"{field}: expected an object keyed by response id")
    by_id = {str(rid): rid for rid in ids}  # canonical keys only: "01" or a full-width "１" would alias "1"
    for key, item in value.items():
        if key not in by_id:
            raise ApiError(422, f"{field}: {key!r} is not a response id of this prompt (keys are its ids as written "
                                "in decimal, e.g. \"0\")")
        yield by_id[key], item


def _rating(value, rid: int) -> int:
    if not _is_int(value) or value not in RATINGS:
        raise ApiError(422, f"ratings: response {rid}: expected an integer from 1 to 7, got {value!r}")
    return value


def _flags(value, rid: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ApiError(422, f"flags: response {rid}: expected a list of flags")
    for flag in value:
        if flag not in FLAGS:
            raise ApiError(422, f"flags: response {rid}: unknown flag {flag!r}; expected one of {', '.join(FLAGS)}")
    if len(set(value)) != len(value):
        raise ApiError(422, f"flags: response {rid}: a flag appears more than once")
    return tuple(value)


def _seconds(value) -> float | None:
    if value is None:
        return None
    try:  # an integer beyond float's range (JSON allows any) overflows
        seconds = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ApiError(422, f"seconds: expected a number >= 0, got {repr(value)[:40]}")
    return seconds
