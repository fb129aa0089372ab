"""OpenAI's summarize-from-feedback TL;DR data as demonstrations (`tldr_sft`), labelled comparisons
(`tldr_comparisons`) or prompts (`tldr_prompts`), with its prompt template and download URLs."""

from __future__ import annotations

from rlhf_jax.data.formats import rows

_OPENAI_SFF = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
TLDR_SFT_URLS: dict[str, str] = {
    split: f"{_OPENAI_SFF}/datasets/tldr_3_filtered/{split}.jsonl" for split in ("train", "valid", "test")
}
# The TL;DR comparison batches are batch3.json .. batch22.json (the other files there are CNN/DM comparisons).
TLDR_COMPARISONS_URL = _OPENAI_SFF + "/dataset/comparisons/batch{n}.json"
TLDR_COMPARISONS_BATCHES = range(3, 23)


def tldr_query(subreddit: str, title: str, post: str) -> str:
    """The TL;DR summarisation prompt, as in OpenAI's summarize-from-feedback."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post.strip()}\n\nTL;DR:"


def _prompt(info: dict, prefix: str) -> str:
    # Some rows have no subreddit (null or absent); the query then reads "r/".
    subreddit = info.get("subreddit")
    if subreddit is not None and not isinstance(subreddit, str):
        raise rows.Invalid("wrong_type",
                           f"field '{prefix}subreddit' must be a string or null, got {rows.type_name(subreddit)}")
    title, post = rows.string(info, "title", prefix), rows.string(info, "post", prefix)
    return tldr_query(subreddit or "", title, post)


def sft(row: dict) -> dict:
    prompt = _prompt(row, "")
    summary = rows.response(rows.string(row, "summary"), "field 'summary'")
    return {"prompt": prompt, "response": " " + summary.strip(), "metadata": ""}


def comparisons(row: dict) -> dict:
    """One labelled comparison: the chosen summary first (rank 0), the others after it, tied at rank 1."""
    info = rows.field(row, "info")
    if not isinstance(info, dict):
        raise rows.Invalid("wrong_type", f"field 'info' must be an object, got {rows.type_name(info)}")
    prompt = _prompt(info, "info.")
    summaries = rows.field(row, "summaries")
    if not isinstance(summaries, list):
        raise rows.Invalid("wrong_type",
                           f"field 'summaries' must be a list of 2 objects, got {rows.type_name(summaries)}")
    if len(summaries) < 2:
        raise rows.Invalid("too_few_responses", f"field 'summaries' must be a list of 2 objects, got {len(summaries)}")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise rows.Invalid("wrong_type", f"field 'summaries[{i}]' must be an object, got {rows.type_name(summary)}")
        text = rows.response(rows.string(summary, "text", f"summaries[{i}]."), f"field 'summaries[{i}].text'")
        texts.append(" " + text.strip())
    rows.check_distinct(texts, "summaries", "text")
    choice = rows.field(row, "choice")
    if not rows.is_int(choice):
        raise rows.Invalid("wrong_type", f"field 'choice' must be an integer, got {rows.type_name(choice)}")
    if not 0 <= choice < len(texts):
        raise rows.Invalid("invalid_choice", f"field 'choice' must be 0..{len(texts) - 1}, got {choice}")
    responses = [texts[choice]] + texts[:choice] + texts[choice + 1:]
    return {"prompt": prompt, "responses": responses, "ranks": [0] + [1] * (len(texts) - 1)}


def prompts(row: dict) -> dict:
    """TL;DR as prompts: the query of a post, no summary."""
    return {"prompt": _prompt(row, ""), "metadata": ""}
