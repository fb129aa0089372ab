"""The base class of every error caused by user input; CLIs print these as one line, without a traceback."""


class UserError(ValueError):
    """Bad config, file, checkpoint or argument: the message names what and where, on one line."""
