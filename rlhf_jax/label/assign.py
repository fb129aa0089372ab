"""Which prompt a labeler sees next.

Every labeler walks the task's prompts in the same stable order and gets the first one they have neither ranked
nor skipped: a labeler who comes back resumes where they left off. A fraction `overlap` of the prompts, spread
evenly through that order, is shared: every labeler gets it, so that their agreement can be measured. Any other
prompt goes to one labeler: it is held for the labeler it was shown to (for `lease` seconds, in memory) and
taken by nobody else once ranked (the service refuses a second labeler's ranking of it, also from a page shown
before a restart or after the lease ran out); a skip frees it for the others.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Collection, Sequence


def is_shared(position: int, overlap: float) -> bool:
    """Whether the prompt at `position` of the order is shown to every labeler: one in 1/overlap, evenly."""
    return math.floor((position + 1) * overlap) > math.floor(position * overlap)


class Assigner:
    def __init__(self, order: Sequence[int], overlap: float, lease: float = 1800.0,
                 clock: Callable[[], float] = time.monotonic):
        self.order = list(order)
        self.shared = {pid for i, pid in enumerate(self.order) if is_shared(i, overlap)}
        self.lease, self.clock = lease, clock
        self.held: dict[int, tuple[str, float]] = {}  # unshared prompt id -> (labeler shown it, when)

    def next(self, labeler: str, answered: Collection[int], ranked_by_others: Collection[int]) -> int | None:
        """The prompt to show `labeler` (held for them when unshared), or None when nothing is left for them."""
        now = self.clock()
        for pid in self.order:
            if pid in answered:
                continue
            if pid not in self.shared:
                if pid in ranked_by_others:
                    continue
                holder, since = self.held.get(pid, (labeler, now))
                if holder != labeler and now - since < self.lease:
                    continue
                self.held[pid] = (labeler, now)
            return pid
        return None

    def waits_on_holds(self, labeler: str, answered: Collection[int], ranked_by_others: Collection[int]) -> bool:
        """Whether prompts `labeler` has not answered are held for others now: once ranked or let go (a skip, a
        lease running out) they are done or `labeler`'s, so asking again later may find one."""
        return any(pid not in answered and pid not in ranked_by_others and self.held_for_another(pid, labeler)
                   for pid in self.order if pid not in self.shared)

    def held_for_another(self, prompt_id: int, labeler: str) -> bool:
        """Whether the unshared prompt is held for another labeler now (shown to them within the lease)."""
        holder, since = self.held.get(prompt_id, (labeler, 0.0))
        return holder != labeler and self.clock() - since < self.lease

    def release(self, prompt_id: int, labeler: str) -> None:
        """`labeler` skipped the prompt: it is held for them no longer (a ranked one is taken for good)."""
        if self.held.get(prompt_id, (None,))[0] == labeler:
            del self.held[prompt_id]
