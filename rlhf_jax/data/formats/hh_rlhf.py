"""Anthropic's HH-RLHF (chosen/rejected whole dialogues) as rankings (`hh_rlhf`), demonstrations (`hh_rlhf_sft`)
or prompts (`hh_rlhf_prompts`), and its download URLs."""

from __future__ import annotations

import os

from rlhf_jax.data.formats import rows

# Download locations, for users with network access; `read_rows` accepts these URLs directly.
_HH_RLHF_BASE = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_RLHF_URLS: dict[str, str] = {
    f"{subset}/{split}": f"{_HH_RLHF_BASE}/{subset}/{split}.jsonl.gz"
    for subset in ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
    for split in ("train", "test")
}

_ASSISTANT = "\n\nAssistant:"


def _hh_prompt(chosen: str) -> str:
    """The dialogue of an HH-RLHF text up to and including its last "\\n\\nAssistant:"."""
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise rows.Invalid("missing_field", "field 'chosen' has no Assistant turn ('\\n\\nAssistant:')")
    return chosen[: cut + len(_ASSISTANT)]


def _prompt(row: dict) -> str:
    """The prompt of a row: the dialogue both texts share up to its last Assistant turn, so that a reply that runs on
    into more turns, on either side, is that side's response (the chosen text's own last turn without 'rejected')."""
    chosen = rows.string(row, "chosen")
    _hh_prompt(chosen)  # a text without an Assistant turn is refused by name
    if row.get("rejected") is None:
        return _hh_prompt(chosen)
    shared = os.path.commonprefix([chosen, rows.string(row, "rejected")])
    if _ASSISTANT not in shared:
        raise rows.Invalid("prefix_mismatch", "fields 'chosen' and 'rejected' do not share a dialogue up to an "
                                              "Assistant turn")
    return _hh_prompt(shared)


def rankings(row: dict) -> dict:
    """HH-RLHF: both texts are the whole dialogue after the prompt (`_prompt`); the chosen one ranks first."""
    chosen, rejected = rows.string(row, "chosen"), rows.string(row, "rejected")
    prompt = _prompt(row)
    responses = [rows.response(chosen[len(prompt):], "the chosen Assistant reply"),
                 rows.response(rejected[len(prompt):], "the rejected Assistant reply")]
    if responses[0] == responses[1]:
        raise rows.Invalid("identical_responses", "fields 'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "responses": responses, "ranks": [0, 1]}


def sft(row: dict) -> dict:
    """HH-RLHF as demonstrations: the prompt `hh_rlhf` builds (`_prompt`) and the chosen text after it."""
    prompt = _prompt(row)
    return {"prompt": prompt, "response": rows.response(row["chosen"][len(prompt):], "the chosen Assistant reply"),
            "metadata": ""}


def prompts(row: dict) -> dict:
    """HH-RLHF as prompts: the prompt `hh_rlhf` builds (`_prompt`), so that the three datasets of one file put each
    dialogue in the same split."""
    return {"prompt": _prompt(row), "metadata": ""}
