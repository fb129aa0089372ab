"""SIGTERM as Ctrl-C for the command-line entry points, and a wait that hears them while user code runs."""

from __future__ import annotations

import _thread
import contextlib
import gc
import os
import signal
import sys
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a preemption, a scheduler's stop, `kill`) raises KeyboardInterrupt as Ctrl-C does, so that the
    same cleanup runs (no partial output is left), where nothing else handles it: a training loop and the label
    server take both signals over while they run. Either signal arriving inside a garbage-collection callback (JAX
    frees device buffers in one), where Python would print the KeyboardInterrupt and drop it, is raised again just
    after. A Ctrl-C that the shell has the process ignore (a job started with `&`) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if _in_gc_callback(frame):
            threading.Timer(0.05, _thread.interrupt_main, (signum,)).start()
            return
        raise KeyboardInterrupt

    ours = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    previous = {s: signal.signal(s, stop) for s in ours}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside one of the garbage collector's callbacks (an exception raised there is lost)."""
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def heard(fn: Callable[[], T]) -> T:
    """fn() on a worker thread while the main thread waits in short sleeps, where signal handlers run: a compiled
    program that calls user code (a reward function in a host callback) can run for as long as that code does, and
    a main thread waiting inside XLA would hear Ctrl-C or SIGTERM only once it returned (a second signal, which
    stops at once, included). The worker is a daemon: a run stopped that way does not wait for it
    (`exit_process`)."""
    done, out = threading.Event(), {}

    def work():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name="rlhf_jax-program", daemon=True)
    worker.start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:  # a signal's: the program goes on in the worker, which the process must not wait for
        _left_running.append(worker)
        raise
    if "error" in out:
        raise out["error"]
    return out["value"]


_left_running: list[threading.Thread] = []


def exit_process(status: int) -> None:
    """sys.exit(status); os._exit where a program stopped by a signal still runs in a worker (`heard`), whose thread
    the interpreter would otherwise tear down inside XLA at exit (an abort, not `status`)."""
    if any(worker.is_alive() for worker in _left_running):
        _exit_now(status)
    if threading.current_thread() is threading.main_thread():
        # a Ctrl-C while the interpreter shuts down (its exit handlers) ends it with `status` at once, where it
        # would print an ignored KeyboardInterrupt's traceback after the run's last line
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, lambda *_: _exit_now(status))
    sys.exit(status)


def _exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
