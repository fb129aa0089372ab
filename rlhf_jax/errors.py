"""The base class of every error caused by user input; CLIs print these as one line, without a traceback."""

import sys


class UserError(ValueError):
    """Bad config, file, checkpoint or argument: the message names what and where, on one line."""


def report(error: UserError) -> int:
    """Print a user error as one `error: ...` line on stderr; returns the CLI's exit status."""
    print(f"error: {error}", file=sys.stderr)
    return 2
