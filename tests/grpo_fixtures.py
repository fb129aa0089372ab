"""Reward functions for the grpo / rloo stage tests, named in configs as grpo_fixtures:FUNCTION (pytest puts tests/
on the Python path, as it does for cli_helpers)."""

from __future__ import annotations

import math

CALLS: list[tuple[list[str], list[str]]] = []  # (prompts, responses) of every call of `recorded`


def recorded(prompts, responses):
    """Records what it was given; prefers short responses."""
    CALLS.append((list(prompts), list(responses)))
    return [-float(len(r)) for r in responses]


def raises(prompts, responses):
    raise ValueError("cannot score these")


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)
