"""The bundled sentiment task (the main job's): its gold reward, its Bradley-Terry labeler and the labeler's ceiling,
and its generated reviews and prompts: well formed, of every sentiment, distinct, a function of the seed."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.tasks import sentiment

ADJECTIVE = "|".join(sentiment.ADJECTIVES)
VERB, ADVERB = "|".join(sentiment.VERBS), "|".join(sentiment.ADVERBS)
REVIEW = re.compile(rf" the (?P<thing>[a-z]+) (?:{VERB}) (?P<adverb>(?:{ADVERB}) )?(?P<first>{ADJECTIVE})"
                    rf"(?: (?:{'|'.join(sentiment.JOINS)}) (?P<second>{ADJECTIVE}))?\.")
PROMPT = re.compile(r"Review #([1-9][0-9]{0,2}) of the ([a-z]+):")


def test_labeler_follows_bradley_terry_and_its_ceiling_is_the_gold_rewards_agreement():
    """Two responses whose gold differs by d: the labeler prefers the better one with probability
    sigmoid(d / T), and the ceiling of these rankings is that same probability."""
    good, bad = " the pizza was superb.", " the pizza was dull."
    d = np.subtract(*sentiment.gold(["p", "p"], [good, bad]))
    assert d > 0
    ranks = sentiment.label(["p"] * 4000, [[good, bad]] * 4000, seed=0)
    preferred = np.mean([r[0] == 0 for r in ranks])
    expected = 1 / (1 + math.exp(-d / sentiment.LABELER_TEMPERATURE))
    assert preferred == pytest.approx(expected, abs=0.025)
    assert sentiment.labeler_ceiling(["p"], [[good, bad]]) == pytest.approx(expected)
    assert sentiment.labeler_ceiling(["p"], [[bad, good]]) == pytest.approx(expected)  # in either order
    assert sentiment.labeler_ceiling(["p"], [[good, good]]) == 0.5 and sentiment.labeler_ceiling([], []) is None
    assert all(sorted(r) == [0, 1] for r in ranks)


def test_gold_is_the_mean_adjective_valence():
    v = sentiment.VALENCE
    assert sentiment.gold(["p"] * 3, [" the lamp was great and dull.", " the lamp was.", " GREAT lamp"]) == \
        pytest.approx([(v["great"] + v["dull"]) / 2, 0.0, v["great"]])
    ranges = ((sentiment.POSITIVE, 0.5, 1.5), (sentiment.NEGATIVE, -1.5, -0.5), (sentiment.NEUTRAL, -0.2, 0.2))
    for words, lo, hi in ranges:
        assert all(lo <= v[w] <= hi for w in words), words
    assert len(set(v.values())) == len(v) == 30  # distinct: two different reviews rarely tie


def test_the_corpus_is_well_formed_reviews_of_every_sentiment():
    """Pretraining text and, for SFT, the neutral writer's demonstrations: reviews of the prompt's thing with two
    different adjectives drawn from every sentiment (so RLHF has a preference left to learn)."""
    n = 4000
    rows = sentiment.corpus(n, seed=0)
    adjectives, adverbs, seconds = [], 0, 0
    for row in rows:
        prompt, review = PROMPT.fullmatch(row["prompt"]), REVIEW.fullmatch(row["response"])
        assert prompt and review and review["thing"] == prompt[2], row
        assert review["first"] != review["second"], row
        adjectives += [review["first"], review["second"]]
        adverbs, seconds = adverbs + bool(review["adverb"]), seconds + bool(review["second"])
    for share, claimed in ((adverbs / n, 0.5), (seconds / n, 0.7)):
        assert abs(share - claimed) < 4 * math.sqrt(claimed * (1 - claimed) / n), (share, claimed)
    used = set(adjectives) - {None}
    assert used == set(sentiment.ADJECTIVES)
    gold = np.asarray(sentiment.gold([r["prompt"] for r in rows], [r["response"] for r in rows]))
    assert (gold > 0.5).mean() > 0.2 and (gold < -0.5).mean() > 0.2, (gold > 0.5).mean()
    assert sentiment.corpus(300, 5) == sentiment.corpus(300, 5) != sentiment.corpus(300, 6)


def test_prompts_are_as_many_as_asked_distinct_and_a_function_of_the_seed(monkeypatch):
    for n in (1, 300, 5000):
        prompts = [r["prompt"] for r in sentiment.prompts(n, 2)]
        assert len(set(prompts)) == n and all(PROMPT.fullmatch(p) for p in prompts)
    assert sentiment.prompts(300, 5) == sentiment.prompts(300, 5) != sentiment.prompts(300, 6)
    monkeypatch.setattr(sentiment, "THINGS", ["pizza", "lamp"])  # at most 999 per thing
    assert len({r["prompt"] for r in sentiment.prompts(1998, 0)}) == 1998
    with pytest.raises(UserError, match="task.prompts=1999: the sentiment task has at most 1998 distinct prompts"):
        sentiment.prompts(1999, 0)
