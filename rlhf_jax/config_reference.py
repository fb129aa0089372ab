"""The configuration reference, docs/configuration.md, generated from the config schema (the dataclasses of
`rlhf_jax.config` and their help texts) so that it cannot drift from the code:

  python -m rlhf_jax.config_reference > docs/configuration.md

tests/test_docs.py fails when the file differs from what this prints.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from rlhf_jax.config import Config, config_to_dict

REGENERATE = "python -m rlhf_jax.config_reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from rlhf_jax/config/; do not edit. Regenerate with `{REGENERATE}`. -->

A run is configured by a YAML file (`--config`) whose keys are loaded into typed, frozen dataclasses
(`rlhf_jax/config/`); any key can be overridden on the command line as `section.key=value`, the last one
winning. Unknown keys, wrong types and bad values stop the run before anything is compiled, with one line naming
the key (and the closest valid key for a typo). `python -m rlhf_jax.main --config CFG --check` validates a config
(every step of a pipeline: keys, values, how they fit together, the steps a pipeline's paths name) and runs
nothing. It reads no dataset, model or device, so that a launcher can check a config before the machines that hold
them exist: a missing dataset or model, or a mesh larger than the devices, is the run's first line.
`python -m rlhf_jax.main --help` prints the same keys as below.
A config with a `pipeline:` mapping runs several stages, each step's keys as below; its own top-level keys are
`pipeline` (step name -> that step's config), `rounds` and `repeat` (the steps run again each round): see
[the pipeline page](stages/pipeline.md) and its [rounds](stages/pipeline.md#rounds).
"""


def _type(tp: Any) -> str:
    """A key's type as the reference writes it: the choices of a Literal, `X or null`, `list of X`."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type(inner)} or null"
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_type(args[0])}"
    return tp.__name__


def _cell(text: str) -> str:
    """Plain text as a table cell: a `|` would end the cell and `<run_dir>` would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def _tables(cls: type, defaults: dict, prefix: str) -> list[str]:
    """A table of cls's own keys, then one headed table per section under it."""
    rows, sections = ["| key | type | default | meaning |", "|---|---|---|---|"], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp, doc = prefix + f.name, hints[f.name], f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            sections += ["", f"## `{key}`", "", _cell(doc[0].upper() + doc[1:]) + ".", "",
                         *_tables(tp, defaults[f.name], key + ".")]
        else:
            default = json.dumps(defaults[f.name]).replace("|", "\\|")
            rows.append(f"| `{key}` | {_type(tp)} | `{default}` | {_cell(doc)} |")
    return rows + sections


def markdown() -> str:
    """docs/configuration.md: every config key with its type, default and meaning, one table per section."""
    return "\n".join([_INTRO, "## Top-level keys", "", *_tables(Config, config_to_dict(Config()), "")]) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
