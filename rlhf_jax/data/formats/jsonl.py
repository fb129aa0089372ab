"""The generic formats `jsonl_sft`, `jsonl_rankings` and `jsonl_prompts`: rows that already hold the canonical
fields, under names the user may remap (`fields`); rankings as a list of responses with their ranks (renumbered
dense) and optionally whether each one ended (`ended`: false for a sample cut at the length limit, which is
trained without an EOS; absent, every response ended), or as a chosen/rejected pair."""

from __future__ import annotations

import json

from rlhf_jax.data.formats import rows

# Canonical field names each generic format lets the user rename with `fields`.
RENAMABLE = {
    "jsonl_sft": ("prompt", "response", "metadata"),
    "jsonl_rankings": ("prompt", "responses", "ranks", "ended", "chosen", "rejected", "labeler"),
    "jsonl_prompts": ("prompt", "metadata"),
}


def sft(row: dict, names: dict[str, str]) -> dict:
    prompt = rows.prompt(row, names["prompt"])
    response = rows.response(rows.string(row, names["response"]), f"field {names['response']!r}")
    return {"prompt": prompt, "response": response, "metadata": _metadata(row, names["metadata"])}


def prompts(row: dict, names: dict[str, str]) -> dict:
    return {"prompt": rows.prompt(row, names["prompt"]), "metadata": _metadata(row, names["metadata"])}


def rankings(row: dict, names: dict[str, str], notes: list[str]) -> dict:
    """A ranking, and who ranked it where the row says: a labeler's rows of one prompt become one example."""
    ranking = _ranking(row, names, notes)
    if names["labeler"] in row:
        labeler = rows.string(row, names["labeler"])
        if not labeler.strip():
            raise rows.Invalid("empty_labeler", f"field {names['labeler']!r} is empty; leave it out when no labeler "
                                                "is known")
        ranking["labeler"] = labeler
    return ranking


def _ranking(row: dict, names: dict[str, str], notes: list[str]) -> dict:
    prompt = rows.prompt(row, names["prompt"])
    if "metadata" in row:
        notes.append("metadata_not_kept")  # a prompt's rows become one example: no row's metadata is kept
    has_pair = names["chosen"] in row or names["rejected"] in row
    if has_pair and names["ended"] in row:
        raise rows.Invalid("ambiguous_fields", f"field {names['ended']!r} goes with {names['responses']!r}, not a "
                                               f"{names['chosen']!r}/{names['rejected']!r} pair")
    if names["responses"] not in row and has_pair:
        return _pairwise(prompt, row, names["chosen"], names["rejected"])
    if has_pair:  # both forms: one of them would be dropped
        raise rows.Invalid("ambiguous_fields", f"both {names['responses']!r} and a {names['chosen']!r}/"
                                               f"{names['rejected']!r} pair; give one of the two")
    if names["responses"] not in row:
        raise rows.Invalid("missing_field", f"missing field {names['responses']!r} "
                                            f"(or a {names['chosen']!r}/{names['rejected']!r} pair)",
                           missing=names["responses"])
    responses = _responses(row, names["responses"])
    ranks = _int_list(row, names["ranks"])
    dense = _dense_ranks(ranks, len(responses), names["ranks"])
    if dense != ranks:
        notes.append("non_dense_ranks")  # accepted, but the user may not have meant gaps or an offset
    ranking = {"prompt": prompt, "responses": responses, "ranks": dense}
    if names["ended"] in row:
        ranking["ended"] = _ended(row, names["ended"], len(responses))
    return ranking


def _pairwise(prompt: str, row: dict, chosen_name: str, rejected_name: str) -> dict:
    chosen = rows.response(rows.string(row, chosen_name), f"field {chosen_name!r}")
    rejected = rows.response(rows.string(row, rejected_name), f"field {rejected_name!r}")
    if chosen == rejected:
        raise rows.Invalid("identical_responses", f"fields {chosen_name!r} and {rejected_name!r} are identical")
    return {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}


def _responses(row: dict, name: str) -> list[str]:
    responses = rows.field(row, name)
    expected = f"field {name!r} must be a list of at least 2 strings"
    if not isinstance(responses, list):
        raise rows.Invalid("wrong_type", f"{expected}, got {rows.type_name(responses)}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise rows.Invalid("wrong_type", f"field '{name}[{i}]' must be a string, got {rows.type_name(response)}")
        rows.response(response, f"field '{name}[{i}]'")
    if len(responses) < 2:
        raise rows.Invalid("too_few_responses", f"{expected}, got {len(responses)}")
    rows.check_distinct(responses, name)
    return responses


def _ended(row: dict, name: str, n_responses: int) -> list[bool]:
    values = rows.field(row, name)
    if not isinstance(values, list) or not all(isinstance(v, bool) for v in values):
        got = rows.type_name(values) if not isinstance(values, list) else "a list with a non-boolean"
        raise rows.Invalid("wrong_type", f"field {name!r} must be a list of booleans (false: the response was cut "
                                         f"before its end), got {got}")
    if len(values) != n_responses:
        raise rows.Invalid("invalid_ended", f"field {name!r} must have one value per response ({n_responses}), "
                                            f"got {len(values)}")
    return values


def _int_list(row: dict, name: str) -> list[int]:
    values = rows.field(row, name)
    if not isinstance(values, list) or not all(rows.is_int(v) for v in values):
        got = rows.type_name(values) if not isinstance(values, list) else "a list with a non-integer"
        raise rows.Invalid("wrong_type", f"field {name!r} must be a list of integers, got {got}")
    return values


def _dense_ranks(ranks: list[int], n_responses: int, name: str) -> list[int]:
    """Ranks renumbered 0, 1, 2, ... in order, ties kept: [2, 1, 1] -> [1, 0, 0]. A rank outside [0, K) is
    refused: K responses have at most K places, so it is a mistake (1-based ranks, a score, another row's)."""
    if len(ranks) != n_responses:
        raise rows.Invalid("invalid_ranks", f"field {name!r} must have one rank per response ({n_responses}), "
                                            f"got {len(ranks)}")
    outside = [r for r in ranks if not 0 <= r < n_responses]
    if outside:
        raise rows.Invalid("invalid_ranks", f"field {name!r} must hold ranks in [0, {n_responses}) for its "
                                            f"{n_responses} responses (0 = best), got {outside[0]}")
    levels = sorted(set(ranks))
    if len(levels) < 2:
        raise rows.Invalid("invalid_ranks", f"field {name!r} ties every response, so there is no preference to learn")
    dense = {rank: i for i, rank in enumerate(levels)}
    return [dense[r] for r in ranks]


def _metadata(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    # default=str: Parquet rows can hold dates and bytes, which JSON has no type for.
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
                          allow_nan=False)
    except ValueError:  # a Parquet float NaN or infinity, which JSON has no value for
        raise rows.Invalid("invalid_metadata", f"field {name!r} holds NaN or an infinity, which JSON has no value "
                                               "for") from None
