"""Stanford Human Preferences (SHP): two comments on one Reddit post, the one people preferred (by later votes)
labelled, as rankings (`shp`); the rows of one post are grouped into one ranking element like HH-RLHF's. Its
download URLs: JSON lines, one file per subreddit and split."""

from __future__ import annotations

from rlhf_jax.data.formats import rows

# Download locations, for users with network access; `read_rows` accepts these URLs directly.
_BASE = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main"
SHP_SUBREDDITS = ("askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs",
                  "askengineers", "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience",
                  "asksciencefiction", "asksocialscience", "askvet", "changemyview", "explainlikeimfive",
                  "legaladvice")
SHP_URLS: dict[str, str] = {f"{subreddit}/{split}": f"{_BASE}/{subreddit}/{split}.json"
                            for subreddit in SHP_SUBREDDITS for split in ("train", "validation", "test")}


def rankings(row: dict) -> dict:
    """The post (`history`) is the prompt; `labels` 1 means comment A was preferred to B, 0 that B was."""
    prompt = rows.prompt(row, "history")
    responses = [rows.response(rows.string(row, name), f"field {name!r}") for name in ("human_ref_A", "human_ref_B")]
    if responses[0] == responses[1]:
        raise rows.Invalid("identical_responses", "fields 'human_ref_A' and 'human_ref_B' are identical")
    label = rows.field(row, "labels")
    if not rows.is_int(label) or label not in (0, 1):
        raise rows.Invalid("invalid_choice", f"field 'labels' must be 1 (A preferred) or 0 (B preferred), got "
                                             f"{label!r}")
    return {"prompt": prompt, "responses": responses, "ranks": [0, 1] if label == 1 else [1, 0]}
