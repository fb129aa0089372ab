"""The prepare stage: imports a public or user format as a dataset in data.dir."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_jax.config import Config
from rlhf_jax.errors import UserError
from rlhf_jax.runtime.fsio import write_json_atomically


def check_prepare(cfg: Config) -> None:
    from rlhf_jax.data.formats import FORMATS
    from rlhf_jax.data.prepare import check_name

    p = cfg.prepare
    for key in ("format", "inputs", "name"):
        if not getattr(p, key):
            raise UserError(f"stage 'prepare' needs prepare.{key}")
    if p.format not in FORMATS:
        raise UserError(f"prepare.format={p.format!r}: unknown; expected one of {sorted(FORMATS)}")
    check_name(p.name)


def run_prepare(cfg: Config, run_dir: Path) -> dict:
    """Imports prepare.inputs as dataset prepare.name in data.dir (replacing it: a pipeline reruns an
    unfinished step whole)."""
    from rlhf_jax.data.prepare import prepare, quiet_tfds

    check_prepare(cfg)
    quiet_tfds()  # the summary below says what was written
    p = cfg.prepare
    summary = {"stage": "prepare", **prepare(p.format, list(p.inputs), cfg.data.dir, p.name, p.eval_fraction,
                                              p.skip_invalid, overwrite=True)}
    write_json_atomically(run_dir / "summary.json", summary)
    print(json.dumps(summary))
    return summary
