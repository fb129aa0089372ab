"""Reward functions for the grpo / rloo stage tests, named in configs as grpo_fixtures:FUNCTION (pytest puts tests/
on the Python path, as it does for cli_helpers)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CALLS: list[tuple[list[str], list[str]]] = []  # (prompts, responses) of every call of `recorded`


def recorded(prompts, responses):
    """Records what it was given; prefers short responses."""
    CALLS.append((list(prompts), list(responses)))
    return [-float(len(r)) for r in responses]


def recorded_with_metadata(prompts, responses, metadata, ended):
    """Records what it was given, with the keywords a function may take."""
    CALLS.append((list(prompts), list(responses), list(metadata), list(ended)))
    return [0.0] * len(responses)


def misspelt(prompts, responses, metdata):
    return [0.0] * len(responses)


def raises(prompts, responses):
    raise ValueError("cannot score these")


class FunctionTimedOut(BaseException):
    """What timeout libraries raise (func_timeout's, asyncio's CancelledError): not an Exception."""


def times_out(prompts, responses):
    raise FunctionTimedOut("took too long")


def slow(prompts, responses):
    """Says it was called (a file at $RLHF_TEST_CALLED), then takes a minute: a judge that hangs."""
    Path(os.environ["RLHF_TEST_CALLED"]).write_text("called")
    time.sleep(60)
    return [0.0] * len(responses)


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)
