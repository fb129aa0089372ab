"""K-way rankings as the ordered (better, worse) pairs a reward model is trained on."""

from __future__ import annotations

import numpy as np


def pairs_from_ranks(ranks) -> tuple[np.ndarray, np.ndarray]:
    """(better, worse) response indices of every ordered pair of one dense ranking (0 best): a K-way ranking
    is all its pairs, K*(K-1)/2 without ties. Ties give no pair (InstructGPT drops them)."""
    ranks = np.asarray(ranks)
    better, worse = np.nonzero(ranks[:, None] < ranks[None, :])
    return better.astype(np.int32), worse.astype(np.int32)
