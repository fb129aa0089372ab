"""Convert between HF checkpoint directories and rlhf_jax (Orbax) model checkpoints.

  python -m rlhf_jax.convert --from-hf DIR --out CKPT_DIR
  python -m rlhf_jax.convert --to-hf --checkpoint CKPT_DIR --out DIR [--dtype bfloat16]

Language models export as *ForCausalLM, reward/value models (scalar head) as *ForSequenceClassification with
one label, a pad id that is never an EOS id (transformers scores the last non-pad token) and the reward gain
folded into the score weights (normalised reward = logits[:, 0] + config.reward_norm["bias"]).

A non-empty --out is replaced only with --overwrite, only when it holds a model (model.json, or config.json with
safetensors weights: never a directory of other files), and then as a whole once the new directory is complete
(a failed write leaves it as it was); --out may not be, be inside or contain the input. A model without
tokenizer files converts with a warning: its export has none either, so generation and training refuse it until
they are copied in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rlhf_jax.errors import UserError, naming_flags, out_of_memory_in_one_line, report
from rlhf_jax.models import hf
from rlhf_jax.models.checkpoint import load_model, save_model
from rlhf_jax.runtime import fsio


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = ap.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="HF checkpoint directory to import")
    direction.add_argument("--to-hf", action="store_true", help="export --checkpoint to a HF directory")
    ap.add_argument("--checkpoint", help="rlhf_jax model checkpoint to export (with --to-hf)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="export dtype (default: as stored)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output directory (as a whole, once the new one is complete)")
    args = ap.parse_args(argv)
    try:
        with out_of_memory_in_one_line("converting holds the whole model in host memory, read and written once "
                                       "each: it needs a host with more free memory"):
            loaded = _convert(args)
    except UserError as e:
        return report(naming_flags(e, {}, [("--out", args.out), ("--from-hf", args.from_hf),
                                           ("--checkpoint", args.checkpoint)]))
    print(json.dumps({"out": args.out, "family": loaded.cfg.family, "head": loaded.head,
                      "layers": loaded.cfg.n_layers, "d_model": loaded.cfg.d_model}))
    return 0


def _convert(args):
    """The model read from the input and written to --out."""
    if args.to_hf and not args.checkpoint:
        raise UserError("--to-hf needs --checkpoint CKPT_DIR")
    if args.from_hf and (args.checkpoint or args.dtype):  # an import keeps the HF files' dtype
        raise UserError(f"--from-hf imports one HF directory as it is stored; "
                        f"{'--checkpoint' if args.checkpoint else '--dtype'} applies to --to-hf only")
    source = args.from_hf or args.checkpoint
    fsio.check_out_dir(args.out, args.overwrite, [source])  # before the (slow) load
    _check_replaceable(Path(args.out))
    loaded = load_model(source)
    if loaded.tokenizer_dir is None:
        print(f"warning: {source} has no tokenizer files (tokenizer.json, vocab.json or tokenizer.model), so "
              f"{args.out} has none: generation and training refuse it until they are copied in", file=sys.stderr)
    if args.from_hf:
        save_model(args.out, loaded.params, loaded.cfg, loaded.head, loaded.tokenizer_dir, args.overwrite,
                   extra=loaded.extra)
    else:
        hf.save_hf(args.out, loaded.params, loaded.cfg, loaded.head, loaded.tokenizer_dir, args.dtype,
                   extra_config=loaded.extra, overwrite=args.overwrite)
    return loaded


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a model directory as a whole: a directory of other files (a project, a home) would
    be deleted with it, so it is refused."""
    if out.is_dir() and any(out.iterdir()) and not ((out / "model.json").is_file()
                                                    or ((out / "config.json").is_file() and hf.has_weights(out))):
        raise UserError(f"--out {out}: holds files but no model (no model.json, nor config.json with safetensors "
                        "weights); --overwrite replaces only a model directory, so write to another --out")


if __name__ == "__main__":
    sys.exit(main())
