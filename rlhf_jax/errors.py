"""How a run ends when it cannot go on: one line on stderr, no traceback, and a distinct exit status.

Exit statuses (documented in docs/reliability.md):
  0  done
  2  user error: a bad config, file, checkpoint or argument (nothing new is written)
  3  diverged: a non-finite loss, gradient norm or parameter; the last finite checkpoint stays
  4  interrupted by SIGTERM or SIGINT after saving a checkpoint; rerun the same command to resume
  5  a step does not fit the device memory: found by a dry run (--dry-run, rlhf_jax/plan/), or met by a run
     (the host's memory too)
"""

import contextlib
import json
import os
import re
import sys
from typing import Sequence


class UserError(ValueError):
    """Bad config, file, checkpoint or argument: the message names what and where, on one line."""

    exit_code = 2
    prefix = "error: "


class UserCodeError(UserError):
    """User code named in a config (a gold scorer, a labeler, a reward function) failed: the message ends with the
    code's own words, `verbatim`, which a CLI's rewriting of config keys into its flags leaves as they are."""

    def __init__(self, message: str, verbatim: str):
        super().__init__(message + verbatim)
        self.verbatim = verbatim


class DivergedError(UserError):
    """Training produced non-finite values; nothing non-finite was saved or exported."""

    exit_code = 3


class Interrupted(UserError):
    """A signal stopped the run after a checkpoint was saved."""

    exit_code = 4
    prefix = ""


class OutOfMemory(UserError):
    """A device could not allocate what a step needs (its batch, lengths or model): nothing of the step was kept."""

    exit_code = 5


DRY_RUN_HINT = ("`python -m rlhf_jax.main --config CFG --dry-run` plans each step's memory and names the micro-batch "
                "(optim.grad_accum_steps) and model.remat that fit")


def memory_error_in(error: BaseException) -> BaseException | None:
    """The host's MemoryError or XLA's RESOURCE_EXHAUSTED behind `error` (itself, or what it wraps: Orbax wraps a
    failed read in an Exception of its own), or None. Such an error is no fault of the files being read: code that
    reads checkpoints and takes any failure for damage raises it instead."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines = str(error).strip().splitlines()  # jax.errors.JaxRuntimeError, matched without importing jax here
        if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and lines
                                              and "RESOURCE_EXHAUSTED" in lines[0]):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def out_of_memory_in_one_line(hint: str = DRY_RUN_HINT):
    """XLA's RESOURCE_EXHAUSTED (at compile or run time, on any backend) and the host's MemoryError as one
    OutOfMemory line with `hint`, the way to a fit, instead of pages of traceback."""
    try:
        yield
    except RuntimeError as e:
        if memory_error_in(e) is not e:
            raise
        raise OutOfMemory(f"out of device memory ({str(e).strip().splitlines()[0][:200]}); {hint}") from None
    except MemoryError as e:  # the host's: numpy's arrays of a batch, a checkpoint read into memory
        raise OutOfMemory(f"out of host memory ({str(e).splitlines()[0][:200] if str(e) else 'MemoryError'}); "
                          f"{hint}") from None


@contextlib.contextmanager
def lost_processes_in_one_line():
    """With several processes, a wait for the others that timed out (JAX's key-value store and barriers, when the
    backend starts or in a collective) as one line saying where to look, instead of a traceback: another process
    stopped on an error of its own (its log has that line) or never started."""
    try:
        yield
    except RuntimeError as e:  # jax.errors.JaxRuntimeError, matched without importing jax here
        lines = str(e).strip().splitlines()
        if not lines or not any(mark in lines[0] for mark in ("GetKeyValue", "Barrier", "DEADLINE_EXCEEDED")):
            raise
        raise UserError(f"distributed: waiting for the other processes timed out ({lines[0][:200]}); one of them "
                        "stopped on an error of its own (see its log) or never started") from None


def report(error: UserError) -> int:
    """Print the error as one line on stderr; returns the CLI's exit status."""
    print(f"{error.prefix}{error}", file=sys.stderr)
    return error.exit_code


def os_reason(error: BaseException) -> str:
    """The OS's words for an error: strerror, a bare errno, the errno that tensorstore or safetensors quote in
    their messages, or else the message's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, OSError) and error.args and isinstance(error.args[0], int):
        return os.strerror(error.args[0])
    text = str(error)
    code = re.search(r"os[ _]error[ _]code='?(\d+)|os error (\d+)", text)
    if code:
        return os.strerror(int(code.group(1) or code.group(2)))
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def os_error_message(error: OSError) -> str:
    """'<path>: <what the OS said>' for an OSError, on one line."""
    where = error.filename if error.filename is not None else "?"
    return f"{where}: {os_reason(error)}".replace("\n", " ")


def json_error(e: json.JSONDecodeError, offset: int = 0) -> str:
    """'invalid JSON (Expecting value at column 13)': Python's message with the column in the line (`offset`:
    characters before the parsed text), once, where Python's own ends in 'starting at'."""
    return f"invalid JSON ({e.msg.removesuffix(' at')} at column {offset + e.pos + 1})"


@contextlib.contextmanager
def about(key: str):
    """Marks a UserError raised inside as concerning config key `key` (for `naming_flags`, where one path may be
    given to several flags)."""
    try:
        yield
    except UserError as e:
        e.about = getattr(e, "about", None) or key
        raise


_KEY = re.compile(r"(')?(?<![\w./-])([A-Za-z_][\w.]*\w)(?![\w./-])(')?(=)?")


def naming_flags(error: UserError, flags: dict[str, str], paths: Sequence[tuple[str, str]] = ()) -> UserError:
    """The error of a CLI, naming the flags the user typed: config keys the CLI filled from its flags are written as
    those flags (`'eval.limit' must be >= 0` -> `--limit must be >= 0`, `run_dir=/x: ...` -> `--out /x: ...`; a
    key without a dot only where it reads as a key: quoted, or followed by `=`), and a message about a path given
    by a flag, one of `paths` as (flag, path), gets the flag in front (`/x: does not exist` -> `--checkpoint /x:
    does not exist`; the flag of the key an error is `about` first)."""
    def flag(match: re.Match) -> str:
        quote, key, _, equals = match.groups()
        if key not in flags or not ("." in key or quote or equals):
            return match.group(0)
        return flags[key] + (" " if equals else "")

    text, verbatim = str(error), getattr(error, "verbatim", "")
    if not text.endswith(verbatim):
        verbatim = ""
    text = _KEY.sub(flag, text[:len(text) - len(verbatim)]) + verbatim
    ours = flags.get(getattr(error, "about", None) or "")  # the flag of the input the error concerns, tried first
    for name, path in sorted(paths, key=lambda pair: pair[0] != ours):
        if path and any(text.startswith(f"{form}{end}") for form in {str(path), os.path.realpath(path)}
                        for end in ":/"):
            text = f"{name} {text}"
            break
    error.args = (text,)
    return error
