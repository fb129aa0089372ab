"""The labeling service behind the web app: the answers of the pinned JSON API, from the store and the assigner,
one request at a time (concurrent labelers never get the same unshared prompt, and `done` counts toward the
Goal). Sources of the responses never leave it."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

from rlhf_jax.label import agreement, validate
from rlhf_jax.label.assign import Assigner
from rlhf_jax.label.store import Store
from rlhf_jax.label.validate import ApiError


@dataclasses.dataclass(frozen=True)
class Goal:
    """What labeling waits for: `target` rankings stored (every labeler's), or with `target` 0 every prompt ranked
    by at least one labeler (a shared prompt's further rankings then measure agreement and do not count)."""

    store: Store
    target: int

    @property
    def total(self) -> int:
        return self.target or len(self.store.prompts)

    def done(self) -> int:
        return self.store.done() if self.target else self.store.prompts_ranked()

    def __str__(self) -> str:
        return f"{self.done()}/{self.total} {'rankings stored' if self.target else 'prompts ranked'}"


class LabelService:
    def __init__(self, store: Store, target: int, overlap: float, on_saved: Callable[[int], None] = lambda done: None):
        """`target`: see Goal. `on_saved(done)` after every stored ranking."""
        self.store, self.on_saved = store, on_saved
        self.goal = Goal(store, target)
        self.target = self.goal.total
        self.assigner = Assigner(sorted(store.prompts), overlap)
        self._lock = threading.Lock()

    def next(self, labeler) -> dict:
        """GET /api/next?labeler=NAME."""
        name = validate.labeler_name(labeler)
        with self._lock:
            done = self.goal.done()
            if done >= self.target:
                return {"prompt_id": None, "reason": "finished", "done": done, "target": self.target}
            answered, others = self.store.answered(name), self.store.ranked_by_others(name)
            pid = self.assigner.next(name, answered, others)
            if pid is None:
                reason = "held" if self.assigner.waits_on_holds(name, answered, others) else "answered"
                return {"prompt_id": None, "reason": reason, "done": done, "target": self.target}
        prompt = self.store.prompts[pid]
        return {"prompt_id": pid, "prompt": prompt.text,
                "responses": [{"id": r.id, "text": r.text, "ended": r.ended} for r in prompt.responses],
                "done": done, "target": self.target}

    def rank(self, body) -> dict:
        """POST /api/rankings: committed before the answer."""
        ranking = validate.ranking(body, self.store.prompts)
        name, pid = ranking.labeler, ranking.prompt_id
        with self._lock:
            if self.goal.done() >= self.target and not self.store.has_ranked(name, pid):  # replacing one is fine
                raise ApiError(409, f"labeling is finished ({self.goal}): nothing more is stored")
            if pid not in self.assigner.shared:  # one labeler's prompt: the first ranking stays the only one
                if pid in self.store.ranked_by_others(name):
                    raise ApiError(409, f"prompt_id: prompt {pid} is ranked by another labeler (it is not shared)")
                if self.assigner.held_for_another(pid, name):
                    raise ApiError(409, f"prompt_id: prompt {pid} is held for another labeler (it is not shared)")
            self.store.save_ranking(ranking, time.time())
            done = self.goal.done()
        self.on_saved(done)
        return {"saved": True, "done": done, "target": self.target}

    def skip(self, body) -> dict:
        """POST /api/skip."""
        labeler, pid = validate.skip(body, self.store.prompts)
        with self._lock:
            if self.goal.done() >= self.target:
                raise ApiError(409, f"labeling is finished ({self.goal}): nothing more is stored")
            if not self.store.save_skip(labeler, pid, time.time()):
                raise ApiError(409, f"prompt_id: prompt {pid} is ranked by {labeler}; a new ranking replaces it, "
                                    "a skip does not")
            self.assigner.release(pid, labeler)
            done = self.goal.done()
        return {"skipped": True, "done": done, "target": self.target}

    def stats(self) -> dict:
        """GET /api/stats."""
        return {**agreement.stats(self.store.rankings(), self.store.skips()), "target": self.target}
