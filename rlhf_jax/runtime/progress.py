"""Progress of a long loop on stderr: a live tqdm bar on a terminal; redirected to a file or a pipe (`make demo >
log 2>&1`, a cluster's log), one plain line per tenth of the work instead of a bar frame per update."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def progress(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A bar with tqdm's update / set_postfix / close, usable as a context manager. `enabled=False` (processes
    other than 0) prints nothing."""
    if sys.stderr.isatty() or not enabled:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                    disable=not enabled)
    return Lines(total, desc, unit, initial)


class Lines:
    """Progress as plain lines, `desc: 30% (60/200 step, 12s) loss=0.41`: one each time another tenth of
    `total` is done."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix: dict = {}
        self.start = time.perf_counter()
        self.tenths = self._tenths()

    def _tenths(self) -> int:
        return 10 * self.n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenths() > self.tenths:
            self.tenths = self._tenths()
            extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {100 * self.n // self.total}% ({self.n}/{self.total} {self.unit}, "
                  f"{time.perf_counter() - self.start:.0f}s){extra}", file=sys.stderr, flush=True)

    def set_postfix(self, ordered_dict: dict | None = None, **kwargs) -> None:
        """Shown on the next line printed, as tqdm shows it beside the bar."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """Nothing to end: every line printed is complete."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
