"""Errors the command line reports as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, a model name, a checkpoint or an option value."""
