"""UltraFeedback, binarized (one prompt, the highest-rated response as `chosen` and another as `rejected`, each a
conversation of messages), as rankings (`ultrafeedback`), demonstrations (`ultrafeedback_sft`) or prompts
(`ultrafeedback_prompts`), and its download URLs (Parquet, one file per split)."""

from __future__ import annotations

from rlhf_jax.data.formats import rows

# Download locations, for users with network access; `read_rows` accepts these URLs directly. *_prefs splits are
# for rankings, *_sft for demonstrations, *_gen for prompts.
_BASE = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/resolve/main/data"
ULTRAFEEDBACK_URLS: dict[str, str] = {
    split: f"{_BASE}/{split}-00000-of-00001.parquet"
    for split in ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
}


def _reply(row: dict, name: str, prompt: str) -> str:
    """The assistant's reply that ends conversation `name`, after the one user turn that is the row's prompt."""
    messages = rows.field(row, name)
    if not isinstance(messages, list):
        raise rows.Invalid("wrong_type", f"field {name!r} must be a list of messages, got {rows.type_name(messages)}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise rows.Invalid("wrong_type", f"field '{name}[{i}]' must be a message object, got "
                                             f"{rows.type_name(message)}")
        turns.append((rows.string(message, "role", f"{name}[{i}]."), rows.string(message, "content", f"{name}[{i}].")))
    if [role for role, _ in turns] != ["user", "assistant"]:
        # a conversation of several turns has no single prompt text to rank its replies after
        raise rows.Invalid("not_one_turn", f"field {name!r} must be one user message and the assistant's reply, got "
                                           f"roles {[role for role, _ in turns]}")
    if turns[0][1] != prompt:
        raise rows.Invalid("prompt_mismatch", f"field '{name}[0].content' is not the row's 'prompt'")
    return rows.response(turns[1][1], f"field '{name}[1].content' (the reply)")


def rankings(row: dict) -> dict:
    """The chosen reply ranks first: the binarized data's choice (by its ratings), as given."""
    prompt = rows.prompt(row, "prompt")
    responses = [_reply(row, "chosen", prompt), _reply(row, "rejected", prompt)]
    if responses[0] == responses[1]:
        raise rows.Invalid("identical_responses", "fields 'chosen' and 'rejected' end in the same reply")
    return {"prompt": prompt, "responses": responses, "ranks": [0, 1]}


def sft(row: dict) -> dict:
    """The prompt and the chosen reply."""
    prompt = rows.prompt(row, "prompt")
    return {"prompt": prompt, "response": _reply(row, "chosen", prompt), "metadata": ""}


def prompts(row: dict) -> dict:
    return {"prompt": rows.prompt(row, "prompt"), "metadata": ""}
