"""Typed, frozen dataclasses loaded from YAML mappings plus `a.b=value` overrides, driven by their type hints.

A schema is a tree of frozen dataclasses whose fields are declared with `opt` (a leaf with its default and help
text) or `section` (a nested dataclass), and whose `__post_init__` calls `coerce` and then `check` per
constraint. Every user mistake raises a one-line `ConfigError` naming the dotted key (with a close match for a
misspelt one), so a bad launch fails before any model or device work starts. The run's schema is
`rlhf_jax.config`.
"""

import collections.abc
import dataclasses
import difflib
import functools
import json
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field, fields, is_dataclass
from typing import Any, Literal

import yaml

from rlhf_jax.errors import UserError


class ConfigError(UserError):
    """A mistake in the user's configuration. The message is always a single line."""


class FieldError(ConfigError):
    """A problem with one field, keyed relative to the dataclass that found it.

    The enclosing section re-raises it with its own prefix, so the final message
    carries the full dotted key even though each dataclass only knows its own fields.
    """

    def __init__(self, key: str, detail: str):
        super().__init__(f"'{key}' {detail}")
        self.key = key
        self.detail = detail


# ---------------------------------------------------------------------------
# Generic conversion driven by type hints
# ---------------------------------------------------------------------------

_SCALAR_NAMES = {int: "an int", float: "a float", str: "a string", bool: "a bool (true/false)"}


def _show(value: Any) -> str:
    """Short one-line rendering of a user value for error messages."""
    if isinstance(value, tuple):
        value = list(value)
    # reprlib: a YAML alias bomb (millions of shared leaves) is shown without building its whole text
    text = _short_repr.repr(value)  # escapes newlines, keeping messages on one line
    return text if len(text) <= 80 else text[:77] + "..."


_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxdict, _short_repr.maxstring = 3, 8, 8, 80


def _optional_inner(tp: Any) -> Any | None:
    """For `X | None` return X; for anything else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported config annotation {tp!r}")
        return inner[0]
    return None


def _type_label(tp: Any) -> str:
    """Compact type name for help text and messages."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_label(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(c) for c in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_label(typing.get_args(tp)[0])}"
    if is_dataclass(tp):
        return "section"
    return tp.__name__


def _expected(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_label(typing.get_args(tp)[0])}"
    return _SCALAR_NAMES.get(tp, _type_label(tp))


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):  # bool is an int subclass; true/false is never a number here
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # yaml.safe_load (YAML 1.1) reads `1e-5` as a string, so accept numeric strings.
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, normalising lists to tuples and numbers to float."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(value, inner, key)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        detail = f"must be one of {list(args)!r}, got {_show(value)}"
        close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
        if close:
            detail += f" (did you mean {close[0]!r}?)"
        raise FieldError(key, detail)

    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported config annotation {tp!r}")
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_convert(v, args[0], key) for v in value)
            except FieldError:
                pass  # report the whole list below; the element alone lacks context
        raise FieldError(key, f"expects {_expected(tp)}, got {_show(value)}")

    if is_dataclass(tp):
        if isinstance(value, tp):
            return value  # already validated when it was built
        if value is None:
            value = {}  # an empty YAML section (`optim:`) means all defaults
        if not isinstance(value, Mapping):
            raise FieldError(key, f"expects a mapping, got {_show(value)}")
        return _build(tp, value, f"{key}.")

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise FieldError(key, f"expects a finite float, got {_show(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r}")
    if isinstance(value, str) and tp in (bool, int) and _reads_as(value, tp):
        raise FieldError(key, f"expects {_expected(tp)}, got the string {_show(value)} (quoted; write it without "
                              "quotes)")
    raise FieldError(key, f"expects {_expected(tp)}, got {_show(value)}")


def _reads_as(text: str, tp: type) -> bool:
    """Whether `text` written without its quotes would be a `tp` (a YAML `"true"` or `"5"`)."""
    try:
        return type(yaml.load(text, Loader=_UniqueKeyLoader)) is tp
    except yaml.YAMLError:
        return False


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(obj: Any) -> None:
    """Convert every field of a (frozen) dataclass in place; called first in __post_init__."""
    for name, tp in _field_types(type(obj)).items():
        object.__setattr__(obj, name, _convert(getattr(obj, name), tp, name))


def check(obj: Any, name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise FieldError(name, f"{requirement}, got {_show(getattr(obj, name))}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key under `cls`: section names and leaf fields."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, tp in _field_types(cls).items():
        if is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _unknown_key_message(key: str, candidates: Sequence[str]) -> str:
    message = f"unknown key {key!r}"
    if key in candidates:  # known when nested: a file wrote `optim.lr: ...` as one name
        section, _, rest = key.partition(".")
        return (f"{message}: a YAML file nests it ({section}: {{{rest}: ...}}); {key}=... is the command line's "
                "form")
    # A misspelt name is matched within its own section first: across every key, 'model.d_modell' is closer to
    # 'eval.reward_model' than to anything the model section has.
    section_, _, name = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section_}
    if siblings:
        close = [siblings[n] for n in difflib.get_close_matches(name, list(siblings), n=1)]
    else:
        close = difflib.get_close_matches(key, candidates, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    elif siblings:
        message += f" (the section {section_!r} has {', '.join(siblings)})"
    return message


def _unknown_keys(data: Mapping, cls: type, prefix: str):
    """Yield dotted paths in `data` that `cls` has no field for."""
    known = _field_types(cls)
    for k, v in data.items():
        path = f"{prefix}{k}"
        if k not in known:
            # Report the deepest path so `sampleing: {temperature: ..}` suggests the full key.
            while isinstance(v, Mapping) and v:
                sub, v = next(iter(v.items()))
                path = f"{path}.{sub}"
            yield path
        elif is_dataclass(known[k]) and isinstance(v, Mapping):
            yield from _unknown_keys(v, known[k], f"{path}.")


def _build(cls: type, data: Mapping, prefix: str) -> Any:
    unknown = next(_unknown_keys(data, cls, prefix), None)
    if unknown is not None:
        candidates = [prefix + k for k in _all_keys(cls)]
        raise ConfigError(_unknown_key_message(unknown, candidates))
    try:
        return cls(**data)
    except FieldError as e:
        raise ConfigError(f"'{prefix}{e.key}' {e.detail}") from None


# ---------------------------------------------------------------------------
# Declaring a schema's fields
# ---------------------------------------------------------------------------


def opt(default: Any, help: str) -> Any:
    """A leaf field: its default and the help text `key_help` shows."""
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    """A nested section: all its defaults unless set."""
    return field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------
# Loading, overrides, serialisation, help
# ---------------------------------------------------------------------------


def from_dict(cls: type, d: Mapping) -> Any:
    """Build a validated `cls` from nested mappings (missing keys take defaults)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config expects a mapping, got {_show(d)}")
    return _build(cls, d, "")


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists), JSON-serialisable and accepted by from_dict."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"invalid YAML: {problem}{where}".split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: safe_load silently keeps the last one,
    so a forgotten earlier setting would win or lose unnoticed."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys written next to `<<: *base` override it; that is what merging is for
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


# Integers as YAML 1.2 reads them: YAML 1.1's `010` (octal, 8) and `1:30` (base 60, 90) changed a value unseen.
_INT = "tag:yaml.org,2002:int"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                       list("-+0123456789"))
_UniqueKeyLoader.add_constructor(_INT, lambda loader, node: _yaml12_int(loader.construct_scalar(node)))


def _yaml12_int(text: str) -> int:
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text)  # int("010") is 10


def _open_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "does not exist"
    if isinstance(err, IsADirectoryError):
        return "is a directory (expected a YAML file)"
    return err.strerror or str(err)


def _read_yaml(cls: type, path: str) -> dict:
    data = read_yaml_mapping(path)
    unknown = next(_unknown_keys(data, cls, ""), None)
    if unknown is not None:
        # Name the file: the same key could also have come from an override.
        raise ConfigError(f"config file {path!r}: {_unknown_key_message(unknown, _all_keys(cls))}")
    return data


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping (duplicate keys refused), not yet checked against the schema."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"config file {path!r}: {_open_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r}: nested too deeply") from None
    if data is None:  # an empty file is more likely a mistake (wrong or truncated file) than a wish for defaults
        raise ConfigError(f"config file {path!r}: holds no settings (expected a mapping of config keys)")
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path!r}: expected a mapping of keys, got {type(data).__name__}")
    return dict(data)


def apply_override(cls: type, data: dict, item: str) -> None:
    """Set one `a.b=value` override in a nested config mapping (the key checked against the schema)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-5")
    key, _, text = item.partition("=")
    key = key.strip()
    leaves = _leaf_types(cls)
    if key not in leaves:
        if key in _field_types(cls):
            raise ConfigError(f"override {key!r} names a section; set its fields, e.g. '{key}.<field>=...'")
        raise ConfigError(_unknown_key_message(key, _all_keys(cls)))
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        value = text  # let type conversion report it against the key
    except RecursionError:
        raise ConfigError(f"override {key!r}: the value is nested too deeply") from None
    if leaves[key] is str and not (isinstance(value, str) and text.lstrip()[:1] in ("'", '"')):
        # the literal text unless quoted: `run_dir=2024` and `model.path=` are not int/None, and `run_dir=out #1`
        # keeps what YAML would drop as a comment
        value = text.strip()

    *parents, leaf = key.split(".")
    node, path = data, ""
    for part in parents:
        path += part
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"'{path}' expects a mapping, got {_show(child)}")
        node[part] = child = dict(child)  # copy so the caller's mapping is left alone
        node, path = child, path + "."
    node[leaf] = value


def load(cls: type, path: str | None, overrides: Sequence[str] = ()) -> Any:
    """Read a YAML config (None = all defaults) and apply `a.b=value` overrides, last one wins."""
    if isinstance(overrides, str):  # a bare string would be split into characters
        overrides = (overrides,)
    data = _read_yaml(cls, path) if path is not None else {}
    for item in overrides:
        apply_override(cls, data, item)
    return from_dict(cls, data)


def _help_lines(cls: type, prefix: str, lines: list[str]) -> None:
    for f in fields(cls):
        tp, key, doc = _field_types(cls)[f.name], prefix + f.name, f.metadata.get("help", "")
        if is_dataclass(tp):
            lines += ["", f"{key}: {doc}"]
            _help_lines(tp, f"{key}.", lines)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {key:<26} {_type_label(tp):<28} default {json.dumps(_plain(default))}")
            lines.append(f"      {doc}")


def key_help(cls: type) -> list[str]:
    """Every key of `cls` with its type, default and help text, section by section."""
    lines: list[str] = []
    _help_lines(cls, "", lines)
    return lines
