"""The bundled task: short product reviews in a small generated language, in the spirit of lm-human-preferences'
sentiment task. A hidden gold reward scores how positive a review is; a simulated labeler ranks K samples per
prompt by that reward with Bradley-Terry (Plackett-Luce) noise, so labelers disagree on close calls as people
do, and the best accuracy any reward model can reach on their rankings (the labeler's ceiling) is known.

Everything is generated from a seed, offline: a corpus to pretrain a base LM (and its tokenizer) on, prompts,
and demonstrations for SFT. The demonstrations are written by a neutral writer (adjectives of any sentiment),
so SFT learns the format and RLHF has a preference to learn: the gold win rate of the PPO policy over the SFT
policy is the headline.
"""

from __future__ import annotations

import math
import re

import numpy as np

from rlhf_jax.errors import UserError

THINGS = ["movie", "book", "hotel", "pizza", "phone", "song", "garden", "laptop", "museum", "coffee", "bike",
          "camera", "concert", "jacket", "lamp", "game"]
POSITIVE = ["great", "lovely", "superb", "charming", "brilliant", "delightful", "excellent", "wonderful", "fresh",
            "elegant"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "bland", "broken", "noisy", "dreadful", "ugly", "poor"]
NEUTRAL = ["long", "short", "new", "old", "big", "small", "red", "simple", "quiet", "plain"]
ADVERBS = ["very", "quite", "rather", "really", "so"]
VERBS = ["was", "felt", "seemed", "looked"]
JOINS = ["and", "but", "yet"]
WORD = re.compile(r"[a-z]+")


def valences(seed: int = 0) -> dict[str, float]:
    """The hidden gold value of every adjective: positive words in [0.5, 1.5], negative in [-1.5, -0.5],
    neutral in [-0.2, 0.2]; distinct values, so two different reviews rarely tie."""
    rng = np.random.default_rng(seed)
    out = {}
    for words, lo, hi in ((POSITIVE, 0.5, 1.5), (NEGATIVE, -1.5, -0.5), (NEUTRAL, -0.2, 0.2)):
        out.update(zip(words, rng.uniform(lo, hi, len(words)).round(4).tolist()))
    return out


VALENCE = valences()


def gold(prompts: list[str], responses: list[str]) -> list[float]:
    """The hidden reward: the mean valence of the adjectives of each response (0 with none). Usable as
    `--gold rlhf_jax.tasks.sentiment:gold`."""
    del prompts  # the preference is the same for every prompt
    scores = []
    for response in responses:
        values = [VALENCE[w] for w in WORD.findall(response.lower()) if w in VALENCE]
        scores.append(float(np.mean(values)) if values else 0.0)
    return scores


LABELER_TEMPERATURE = 0.5  # Bradley-Terry noise: P(a ranked above b) = sigmoid((gold_a - gold_b) / T)


def label(prompts: list[str], responses: list[list[str]], seed: int) -> list[list[int]]:
    """The simulated labeler: per prompt, ranks (0 = best) of its responses drawn from a Plackett-Luce model
    over gold / LABELER_TEMPERATURE (each pair ordered with Bradley-Terry probability)."""
    rng = np.random.default_rng(seed)
    ranks = []
    for prompt, texts in zip(prompts, responses):
        utility = np.asarray(gold([prompt] * len(texts), texts)) / LABELER_TEMPERATURE
        noisy = utility + rng.gumbel(size=len(texts))  # the Gumbel trick samples a Plackett-Luce order
        order = np.argsort(-noisy, kind="stable")
        rank = np.empty(len(texts), int)
        rank[order] = np.arange(len(texts))
        ranks.append(rank.tolist())
    return ranks


def labeler_ceiling(prompts: list[str], responses: list[list[str]]) -> float | None:
    """Expected accuracy of the gold reward itself on this labeler's pairwise choices among these responses:
    the best any reward model can score on held-out rankings. A pair of equal gold is a coin flip for the
    labeler, so no model beats 1/2 on it. None without pairs."""
    agree = []
    for prompt, texts in zip(prompts, responses):
        g = np.asarray(gold([prompt] * len(texts), texts))
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                agree.append(1.0 / (1.0 + math.exp(-abs(g[i] - g[j]) / LABELER_TEMPERATURE)))
    return float(np.mean(agree)) if agree else None


def _review(rng: np.random.Generator, thing: str, words: list[str]) -> str:
    """'the pizza was quite bland but fresh.' with adjectives drawn from `words`."""
    first, second = rng.choice(words, 2, replace=False)
    adverb = f"{rng.choice(ADVERBS)} " if rng.random() < 0.5 else ""
    text = f"the {thing} {rng.choice(VERBS)} {adverb}{first}"
    if rng.random() < 0.7:
        text += f" {rng.choice(JOINS)} {second}"
    return text + "."


ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL


def prompt_for(number: int, thing: str) -> str:
    """'Review #17 of the pizza:'; the number only makes prompts distinct (the hash split holds some out)."""
    return f"Review #{number} of the {thing}:"


def corpus(n: int, seed: int) -> list[dict]:
    """Reviews of every sentiment as sft rows: pretraining text (trained on every token) and, from another seed,
    the neutral writer's demonstrations for SFT (well formed, any sentiment)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        thing = str(rng.choice(THINGS))
        rows.append({"prompt": prompt_for(int(rng.integers(1, 1000)), thing),
                     "response": " " + _review(rng, thing, ADJECTIVES)})
    return rows


def prompts(n: int, seed: int) -> list[dict]:
    """Distinct prompts for PPO and (their held-out split) evaluation; at most 999 per thing."""
    rng = np.random.default_rng(seed)
    if n > 999 * len(THINGS):
        raise UserError(f"task.prompts={n}: the sentiment task has at most {999 * len(THINGS)} distinct prompts")

    def draw():
        return int(rng.integers(1, 1000)), str(rng.choice(THINGS))

    found = {draw() for _ in range(4 * n)}
    while len(found) < n:  # only near the limit
        found.add(draw())
    pairs = sorted(found)
    chosen = rng.permutation(len(pairs))[:n]
    return [{"prompt": prompt_for(*pairs[i])} for i in sorted(chosen)]
