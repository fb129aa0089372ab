"""The labeling service behind the web app: the answers of the pinned JSON API, from the store and the assigner,
one request at a time (concurrent labelers never get the same unshared prompt, and `done` counts every stored
ranking). Sources of the responses never leave it."""

from __future__ import annotations

import threading
import time
from typing import Callable

from rlhf_jax.label import agreement, validate
from rlhf_jax.label.assign import Assigner
from rlhf_jax.label.store import Store
from rlhf_jax.label.validate import ApiError


class LabelService:
    def __init__(self, store: Store, target: int, overlap: float, on_saved: Callable[[int], None] = lambda done: None):
        self.store, self.target, self.on_saved = store, target, on_saved
        self.assigner = Assigner(sorted(store.prompts), overlap)
        self._lock = threading.Lock()

    def next(self, labeler) -> dict:
        """GET /api/next?labeler=NAME."""
        name = validate.labeler_name(labeler)
        with self._lock:
            pid = self.assigner.next(name, self.store.answered(name), self.store.ranked_by_others(name))
            done = self.store.done()
        if pid is None:
            return {"prompt_id": None, "done": done, "target": self.target}
        prompt = self.store.prompts[pid]
        return {"prompt_id": pid, "prompt": prompt.text, "responses": [{"id": r.id, "text": r.text}
                                                                          for r in prompt.responses],
                "done": done, "target": self.target}

    def rank(self, body) -> dict:
        """POST /api/rankings: committed before the answer."""
        ranking = validate.ranking(body, self.store.prompts)
        with self._lock:
            done = self.store.save_ranking(ranking, time.time())
        self.on_saved(done)
        return {"saved": True, "done": done, "target": self.target}

    def skip(self, body) -> dict:
        """POST /api/skip."""
        labeler, pid = validate.skip(body, self.store.prompts)
        with self._lock:
            if not self.store.save_skip(labeler, pid, time.time()):
                raise ApiError(409, f"prompt_id: prompt {pid} is ranked by {labeler}; a new ranking replaces it, "
                                    "a skip does not")
            self.assigner.release(pid, labeler)
            done = self.store.done()
        return {"skipped": True, "done": done, "target": self.target}

    def stats(self) -> dict:
        """GET /api/stats."""
        return {**agreement.stats(self.store.rankings(), self.store.skips()), "target": self.target}
