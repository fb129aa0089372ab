"""SIGTERM as Ctrl-C for the command-line entry points, and a wait that hears them while user code runs."""

from __future__ import annotations

import _thread
import atexit
import contextlib
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
    server take both signals over while they run. Either signal landing where Python drops exceptions (a
    garbage-collection or weakref callback, where JAX frees device buffers) is raised again just after: Python
    would print it as ignored and the run go on; one landing inside an import, just after the import. A Ctrl-C that
    the shell has the process ignore (a job started with `&`) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        if _importing(frame):  # raised inside a module's import (numpy's, jax's), it leaves that module broken:
            threading.Timer(0.05, raise_again, (signum,)).start()  # an ImportError, an abort or a crash
            return
        raise KeyboardInterrupt

    def dropped(unraisable):  # sys.unraisablehook: an exception Python cannot raise where it was
        if active and received and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, raise_again, (received[-1],)).start()
        else:
            previous_hook(unraisable)

    def raise_again(signum):  # not once the block is left: the restored handler would raise where none catches it
        if active:
            _thread.interrupt_main(signum)

    ours = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    previous = {s: signal.signal(s, stop) for s in ours}
    previous_hook, sys.unraisablehook, active = sys.unraisablehook, dropped, True
    try:
        yield
    finally:
        active = False  # a hook installed after ours calls it on: from now on it only passes exceptions on
        if sys.unraisablehook is dropped:
            sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (importlib's own frames are among its callers)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
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
    the interpreter would otherwise tear down inside XLA at exit (an abort, not `status`); and where a process of
    several stops on an error of its own (`AGREED`: statuses every process reaches together): JAX's exit handler
    waits for every process at a barrier, while the others wait for this one in a collective it will never join.
    The launcher, or JAX's heartbeat, stops them."""
    if any(worker.is_alive() for worker in _left_running) or (status not in AGREED and _joined_others()):
        _exit_now(status)
    if threading.current_thread() is threading.main_thread():
        # a Ctrl-C while the interpreter shuts down (its exit handlers) ends it with `status` at once, where it
        # would print an ignored KeyboardInterrupt's traceback after the run's last line
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, lambda *_: _exit_now(status))
        _exiting.append(status)
    sys.exit(status)


_exiting: list[int] = []  # the status exit_process ends the process with


def _ignore_signals_in_teardown() -> None:
    """The last exit handler of a process ended by `exit_process`: past it Python gives the signals it handles their
    default action back (SIGTERM's kills, status 143) while the interpreter tears its modules down (a second or two
    of JAX's), but leaves an ignored signal ignored, so that the process still ends with its own status."""
    if _exiting and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


atexit.register(_ignore_signals_in_teardown)  # imported before jax: runs after jax's exit handlers


AGREED = (0, 3, 4)  # done, diverged, interrupted and saved: decided by every process of a run at the same step


def _joined_others() -> bool:
    distributed = sys.modules.get("rlhf_jax.runtime.distributed")  # not imported here: it imports jax
    return distributed is not None and distributed.joined_others()


def _exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
