"""The ranking app for people, on the task a label step stored (label.labeler=people writes RUN_DIR/label.db).

  python -m rlhf_jax.label serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--token T] [--target N] [--overlap F]
  python -m rlhf_jax.label stats RUN_DIR [--json]

serve: the web page where labelers rank, rate and flag responses, until --target rankings are stored, or every
prompt is ranked with --target 0 (by default the label step's label.target) (then exit 0: rerun the label step to
write the dataset) or Ctrl-C / SIGTERM (exit 4: serve again to continue). Binding an
address other than loopback needs --token; labelers then open http://HOST:PORT/?token=TOKEN.
stats: rankings and median seconds per labeler, their pairwise agreement on shared prompts, and the flag counts.

Exit status: 0 done; 2 a user error (one `error:` line); 4 stopped by a signal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rlhf_jax.errors import Interrupted, UserError, naming_flags, report
from rlhf_jax.label import agreement, server
from rlhf_jax.label.assign import is_shared
from rlhf_jax.label.service import Goal
from rlhf_jax.label.store import Store
from rlhf_jax.runtime.fsio import run_dir_lock

DB = "label.db"
FLAGS = {"label.host": "--host", "label.port": "--port", "label.token": "--token", "label.target": "--target",
         "label.overlap": "--overlap"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.label", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the ranking page", description="Serve the ranking page of "
                                "RUN_DIR/label.db until --target rankings are stored or Ctrl-C / SIGTERM.")
    serve.add_argument("run_dir", metavar="RUN_DIR", help="the label step's run dir (holding label.db)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --token)")
    serve.add_argument("--port", default="8000", help="port to bind; 0 picks a free one")
    serve.add_argument("--token", default="", help="a secret every request must carry (?token= or a Bearer header)")
    serve.add_argument("--target", default=None, help="rankings to collect, 0 = until every prompt is ranked "
                       "(default: the label step's)")
    serve.add_argument("--overlap", default=None, help="fraction of prompts every labeler ranks (default: the "
                                                       "label step's)")
    stats = commands.add_parser("stats", help="print the labelers' agreement", description="Rankings and median "
                                "seconds per labeler, pairwise agreement on shared prompts, flag counts.")
    stats.add_argument("run_dir", metavar="RUN_DIR", help="the label step's run dir (holding label.db)")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON (what /api/stats returns)")
    args = ap.parse_args(argv)
    try:
        store = Store(Path(args.run_dir) / DB, writable=args.command != "stats")
        try:
            if args.command == "stats":
                return _stats(store, args.json)
            # one server per task: which unshared prompt is held for whom lives in the server's memory
            with run_dir_lock(args.run_dir, key="RUN_DIR"):
                return _serve(store, args)
        finally:
            store.close()
    except UserError as e:
        return report(naming_flags(e, FLAGS))


def _serve(store: Store, args) -> int:
    port = _number(args.port, int, "--port", lambda p: 0 <= p <= 65535, "an integer from 0 to 65535")
    target = _number(args.target, int, "--target", lambda t: t >= 0, "an integer >= 0 (0: every prompt ranked)",
                     store.meta.get("target", 0))
    overlap = _number(args.overlap, float, "--overlap", lambda f: 0 <= f <= 1, "a number from 0 to 1",
                      store.meta.get("overlap", 0.0))
    server.check_binding(args.host, args.token)
    server.check_target(store, target, overlap)
    if Goal(store, target).done() >= Goal(store, target).total:  # the label step may have written its dataset
        more = (store.done() < len(store.prompts) or any(is_shared(i, overlap) for i in range(len(store.prompts))))
        print(f"label: {Goal(store, target)} in {store.path} already, nothing to serve; " + (
            "a larger --target collects more (then rerun the label step to write the dataset)" if more else
            "every prompt is ranked and none is shared (--overlap): the task holds no more"), file=sys.stderr)
        return 0
    if server.serve(store, args.host, port, args.token, target, overlap):
        print(f"label: {Goal(store, target)} in {store.path}; rerun the label step to write the "
              "dataset", file=sys.stderr)
        return 0
    raise Interrupted(f"label: stopped with {Goal(store, target)} in {store.path}; serve again to "
                      "continue, or run the label step with label.finish=true to write the dataset")


def _number(text: str | None, kind, flag: str, ok, expected: str, default=None):
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected {expected}") from None
    if not ok(value):
        raise UserError(f"{flag} {text!r}: expected {expected}")
    return value


def _stats(store: Store, as_json: bool) -> int:
    figures = agreement.stats(store.rankings(), store.skips())
    print(json.dumps(figures, indent=2) if as_json else describe(figures, store.meta.get("target")))
    return 0


def describe(s: dict, target: int | None) -> str:
    """The figures of agreement.stats as text."""
    of_target = f" of {target}" if target else ""
    lines = [f"{s['rankings']} rankings{of_target} by {len(s['labelers'])} labelers; {s['shared_prompts']} prompts "
             "ranked by more than one", "",
             f"{'labeler':<24} {'rankings':>8} {'skips':>6} {'median s':>9} {'agreement with others':>22}"]
    for name, row in s["labelers"].items():
        agree = f"{_pct(row['agreement_with_others'])} of {row['compared_pairs']} pairs"
        median = "-" if row["median_seconds"] is None else f"{row['median_seconds']:.1f}"
        lines.append(f"{name:<24} {row['rankings']:>8} {row['skips']:>6} {median:>9} {agree:>22}")
    lines += ["", f"pairwise agreement on shared prompts: {_pct(s['agreement'])} of {s['compared_pairs']} response "
                  f"pairs ordered by two labelers ({s['tied_pairs_excluded']} pairs tied by either are left out)"]
    lines += [f"  {a} / {b}: {_pct(p['agreement'])} of {p['compared_pairs']} pairs on {p['prompts']} prompts"
              for p in s["labeler_pairs"] for a, b in [p["labelers"]]]
    lines += ["", "flags: " + ", ".join(f"{flag} {n}" for flag, n in s["flags"].items())]
    return "\n".join(lines)


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
