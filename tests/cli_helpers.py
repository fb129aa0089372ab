"""Running a CLI's `main(argv)` in-process with its output captured, for tests and module-scoped fixtures
(pytest's capsys is per test)."""

from __future__ import annotations

import contextlib
import io


def run_quietly(fn, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fn([str(a) for a in argv])`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
