"""SIGTERM as Ctrl-C for the command-line entry points."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a preemption, a scheduler's stop, `kill`) raises KeyboardInterrupt as Ctrl-C does, so that the
    same cleanup runs (no partial output is left), where nothing else handles it: a training loop and the label
    server take both signals over while they run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
