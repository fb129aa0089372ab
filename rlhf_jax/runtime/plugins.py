"""User code named in a config as MODULE:FUNCTION (a gold scorer, a labeler): imported from the Python path,
never downloaded; a bad name, and a call that raises, is one line naming the key and the function. Keywords a
call offers (which responses ended, the prompts' metadata) reach a function whose signature names them: not one
that only takes **kwargs, which may be a wrapper passing them on to a function that takes none."""

from __future__ import annotations

import difflib
import importlib
import inspect
import reprlib
import sys
import traceback
from types import ModuleType
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.errors import UserCodeError, UserError


def function(spec: str, key: str) -> tuple[Callable, ModuleType]:
    """(the function, its module) named by `spec` = MODULE:FUNCTION."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{key}={spec!r}: expected MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserCodeError(f"{key}={spec!r}: cannot import {module_name!r} ", f"({e})") from None
    except Exception as e:  # noqa: BLE001 - a syntax error, or the module's own code raising at import
        raise UserCodeError(f"{key}={spec!r}: importing {module_name} raised ", f"{_what(e)} ({_where(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}={spec!r}: {module_name} has no function {name!r}")
    return fn, module


def takes(fn: Callable, keyword: str) -> bool:
    """Whether `fn`'s signature (a functools.wraps wrapper's: the wrapped function's) names `keyword`."""
    try:
        parameter = inspect.signature(fn).parameters.get(keyword)
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


# What a scoring function (a reward function, a gold scorer) is told where its signature names them: whether each
# response ended, and each prompt's metadata.
SCORER_KEYWORDS = ("ended", "metadata")

_WARNED: set[tuple[str, str]] = set()  # (who, parameter) warned of: a stage checks its config twice


def check_signature(fn: Callable, who: str, positional: Sequence[str], offered: Sequence[str] = ()) -> None:
    """Before any work: refuses a function the call cannot satisfy (a parameter it requires that the call never
    gives, such as a misspelt keyword, or fewer positional parameters than the call passes), and warns once of a
    parameter with a default that is spelt close to an offered keyword (`metdata=None` would never be given)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will say
        return
    named = [key for key in offered if takes(fn, key)]
    try:
        signature.bind(*positional, **dict.fromkeys(named))
    except TypeError as e:
        keywords = f" and the keywords it names of {', '.join(offered)}" if offered else ""
        raise UserError(f"{who}: {getattr(fn, '__name__', 'the function')}{signature} cannot be called with "
                        f"({', '.join(positional)}){keywords}: {e}") from None
    for parameter in list(signature.parameters)[len(positional):]:
        close = difflib.get_close_matches(parameter, [k for k in offered if k not in named], n=1, cutoff=0.8)
        if close and (who, parameter) not in _WARNED:
            _WARNED.add((who, parameter))
            print(f"warning: {who}: parameter {parameter!r} is never given; did you mean {close[0]!r}?",
                  file=sys.stderr)


def call(fn: Callable, who: str, *args, **offered):
    """fn(*args), with each keyword of `offered` fn takes: an exception from the user's code becomes one line
    starting with `who` (e.g. `eval.gold=MODULE:FUNCTION`) that names the exception and the line that raised it."""
    kwargs = {key: value for key, value in offered.items() if takes(fn, key)}
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:  # Ctrl-C (and SIGTERM, which the runs turn into it) is the operator's, not an error
        raise
    except BaseException as e:  # noqa: BLE001 - user code can fail in any way: sys.exit(), a timeout library's own
        raise UserCodeError(f"{who}: raised ", f"{_what(e)} ({_where(e, fn)})") from None


def _what(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _where(e: BaseException, fn: Callable | None = None) -> str:
    """file:line that raised: the offending line of a syntax error, else the traceback's last frame, or where `fn`
    is defined when the call itself failed (arguments its signature does not take)."""
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    code = getattr(fn, "__code__", None)
    if frame.filename == __file__ and code is not None:
        return f"{code.co_filename}:{code.co_firstlineno}"
    return f"{frame.filename}:{frame.lineno}"


def shown(value) -> str:
    """A short repr of what user code returned, for a one-line error: an array (numpy's, a framework's) by its type,
    shape and dtype, whose own repr spans lines."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if isinstance(shape, tuple) and dtype is not None:
        return f"a {type(value).__module__.split('.')[0]} {type(value).__name__} of shape {shape}, {dtype}"
    return " ".join(reprlib.repr(value).split())


def scores(returned, n: int, who: str, dtype=np.float64) -> np.ndarray:
    """What a reward function or gold scorer returned for `n` responses, as `n` scores of `dtype` (the reward
    function's go into a float32 program): a list, tuple or array of numbers finite in `dtype`, one-dimensional
    or with axes of size 1 beside it (a model's (n, 1) logits); bools count as 0 and 1. Anything else is one line
    naming `who` and the first value that is wrong: a short repr may end before it."""
    what = shown(returned)
    try:
        values = np.asarray(returned)
        if values.dtype.kind not in "biuf":  # strings ("1.5" would parse), None inside, objects
            raise TypeError
    except (TypeError, ValueError):  # ragged nesting too
        if isinstance(returned, (list, tuple)):
            i = next((i for i, x in enumerate(returned) if not _a_number(x)), None)
            if i is not None:
                what = f"a {type(returned).__name__} whose value for response {i} is {shown(returned[i])}"
        raise UserError(f"{who}: returned {what}; expected {n} numbers, one per response") from None
    if sum(size > 1 for size in values.shape) > 1 or values.ndim == 0:
        raise UserError(f"{who}: returned {what}; expected a list of {n} numbers, one per response")
    if values.size != n:
        raise UserError(f"{who}: returned {values.size} values for {n} responses ({what})")
    values = values.reshape(n)
    with np.errstate(over="ignore"):  # 1e39 is finite, not in float32: reported below, not warned about
        bad = np.flatnonzero(~np.isfinite(values.astype(dtype)))
    if bad.size:
        raise UserError(f"{who}: returned {bad.size} values for {n} responses that are not finite in "
                        f"{np.dtype(dtype).name} (the first: {values[bad[0]]} for response {bad[0]})")
    return values.astype(dtype)


def _a_number(value) -> bool:
    """A Python, numpy or framework scalar (a 0-d array) of a real or bool type."""
    try:
        return np.ndim(value) == 0 and np.asarray(value).dtype.kind in "biuf"
    except Exception:  # noqa: BLE001 - whatever user code returned
        return False
