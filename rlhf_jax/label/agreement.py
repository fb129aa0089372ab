"""How much labelers agree, as InstructGPT measured it (72.6 +- 1.5% among its training labelers): of the response
pairs that two labelers both ordered on a prompt they both ranked, the fraction they ordered the same way. A pair
that either of them tied states no order and is left out (and counted). Also rankings and median seconds per
labeler, and the flag counts."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict

from rlhf_jax.label.store import Ranking
from rlhf_jax.label.validate import FLAGS


def stats(rankings: list[Ranking], skips: dict[str, int]) -> dict:
    """The figures /api/stats returns and `python -m rlhf_jax.label stats` prints."""
    by_prompt: dict[int, list[Ranking]] = defaultdict(list)
    for r in rankings:
        by_prompt[r.prompt_id].append(r)
    pairs: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (labeler a, labeler b) -> agreed, compared, ...
    for prompt_rankings in by_prompt.values():
        for a, b in itertools.combinations(sorted(prompt_rankings, key=lambda r: r.labeler), 2):
            pairs[a.labeler, b.labeler].update(compare(a, b), prompts=1)
    total = sum(pairs.values(), Counter())
    labelers = sorted({r.labeler for r in rankings} | set(skips))
    return {
        "rankings": len(rankings),
        "labelers": {name: _labeler(name, rankings, pairs, skips.get(name, 0)) for name in labelers},
        "agreement": _fraction(total),
        "compared_pairs": total["compared"],
        "tied_pairs_excluded": total["tied"],
        "shared_prompts": sum(len({r.labeler for r in rs}) > 1 for rs in by_prompt.values()),
        "labeler_pairs": [{"labelers": list(names), "prompts": c["prompts"], "compared_pairs": c["compared"],
                           "tied_pairs_excluded": c["tied"], "agreement": _fraction(c)}
                          for names, c in sorted(pairs.items())],
        "flags": {flag: sum(flag in f for r in rankings for f in r.flags.values()) for flag in FLAGS},
    }


def compare(a: Ranking, b: Ranking) -> Counter:
    """Over the response pairs of one prompt: agreed, compared (both ordered it) and tied (either tied it)."""
    level_a, level_b = _levels(a), _levels(b)
    counts = Counter(agreed=0, compared=0, tied=0)
    for i, j in itertools.combinations(sorted(level_a), 2):
        order_a, order_b = _sign(level_a[i] - level_a[j]), _sign(level_b[i] - level_b[j])
        if order_a == 0 or order_b == 0:
            counts["tied"] += 1
        else:
            counts["compared"] += 1
            counts["agreed"] += order_a == order_b
    return counts


def _labeler(name: str, rankings: list[Ranking], pairs: dict, skipped: int) -> dict:
    seconds = [r.seconds for r in rankings if r.labeler == name and r.seconds is not None]
    with_others = sum((c for names, c in pairs.items() if name in names), Counter())
    return {"rankings": sum(r.labeler == name for r in rankings), "skips": skipped,
            "median_seconds": statistics.median(seconds) if seconds else None,
            "agreement_with_others": _fraction(with_others), "compared_pairs": with_others["compared"]}


def _levels(r: Ranking) -> dict[int, int]:
    """Response id -> its level (0 = best)."""
    return {rid: i for i, level in enumerate(r.levels) for rid in level}


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _fraction(c: Counter) -> float | None:
    return c["agreed"] / c["compared"] if c["compared"] else None
