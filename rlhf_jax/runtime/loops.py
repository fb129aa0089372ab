"""A `lax.while_loop` that may stop early (the sampler's decode, which ends once every row has), named by its
most trips: a compiled program keeps the name, from which `rlhf_jax.plan.flops` counts its body that many times
where XLA records no trip count (it infers one for some such loops, not for all)."""

from __future__ import annotations

import re

import jax

MOST_TRIPS = re.compile(r"/at_most_(\d+)_trips/")  # in the while instruction's op_name


def bounded_while_loop(cond, body, carry, most_trips: int):
    """`jax.lax.while_loop(cond, body, carry)`, where `cond` stops the loop after at most `most_trips` trips."""
    with jax.named_scope(f"at_most_{most_trips}_trips"):
        return jax.lax.while_loop(cond, body, carry)
