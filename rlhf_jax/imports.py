"""User code named in a config as MODULE:FUNCTION (a gold scorer, a labeler): imported from the Python path,
never downloaded; a bad name is one line naming the key."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

from rlhf_jax.errors import UserError


def function(spec: str, key: str) -> tuple[Callable, ModuleType]:
    """(the function, its module) named by `spec` = MODULE:FUNCTION."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{key}={spec!r}: expected MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{key}={spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}={spec!r}: {module_name} has no function {name!r}")
    return fn, module
