"""Prepare a dataset for rlhf_jax from the files users have.

  python -m rlhf_jax.data --format {jsonl_sft,jsonl_rankings,jsonl_prompts,hh_rlhf,hh_rlhf_sft,hh_rlhf_prompts,
      tldr_sft,tldr_comparisons,tldr_prompts,ultrafeedback,ultrafeedback_sft,ultrafeedback_prompts,shp} \\
      --input PATH [--input PATH ...] --data-dir DIR --name NAME [--eval-fraction F] [--skip-invalid]

Inputs may be .jsonl, .jsonl.gz, .json (JSON lines) or .parquet files, or http(s) URLs (downloaded once into
~/.cache/rlhf_jax/downloads). Prints one JSON summary: examples written per split and rows skipped by reason.
A bad row stops the run with file:line and the problem, and nothing is written, unless --skip-invalid is given.
--overwrite replaces an existing dataset whole, only once the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rlhf_jax.data.formats import FORMATS
from rlhf_jax.errors import Interrupted, UserError, report
from rlhf_jax.runtime.signals import sigterm_as_ctrl_c


def _fields(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        canonical, sep, user = pair.partition("=")
        if not sep or not canonical or not user:
            raise UserError(f"--field expects CANONICAL=NAME (e.g. prompt=question), got {pair!r}")
        if canonical in out:
            raise UserError(f"--field {pair}: {canonical} is already read from {out[canonical]!r}; give each field "
                            "once")
        out[canonical] = user
    return out


def _check_flags(args: argparse.Namespace) -> None:
    """Name the flag, before any input is read (prepare() itself can only speak of an eval fraction)."""
    if not 0 <= args.eval_fraction < 1:  # also refuses NaN
        raise UserError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=sorted(FORMATS))
    ap.add_argument("--input", required=True, action="append", help="input file or URL; repeat for several")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--name", required=True, help="dataset name (lower_snake_case)")
    ap.add_argument("--eval-fraction", type=float, default=0.0, help="share of prompts held out as 'eval'")
    ap.add_argument("--skip-invalid", action="store_true", help="skip bad rows (counted by reason)")
    ap.add_argument("--field", action="append", default=[], metavar="CANONICAL=NAME",
                    help="generic jsonl formats: read a canonical field (prompt, response, responses, ranks, "
                         "ended, chosen, rejected, labeler, metadata) from another key")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    args = ap.parse_args(argv)
    try:
        _check_flags(args)
        from rlhf_jax.data.prepare import prepare, quiet_tfds

        quiet_tfds()
        with sigterm_as_ctrl_c():
            summary = prepare(args.format, args.input, args.data_dir, args.name, args.eval_fraction,
                              args.skip_invalid, _fields(args.field), args.overwrite)
    except KeyboardInterrupt:  # the dataset is built beside its path, which it replaces only when complete
        return report(Interrupted(f"interrupted: nothing was written to {args.data_dir} (a dataset already there is "
                                  "as it was); rerun the same command"))
    except UserError as e:
        return report(e)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
