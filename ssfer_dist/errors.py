"""Errors shown to users as one line (no traceback) with a non-zero exit."""


class UserError(RuntimeError):
    """Bad input (config, file, URL, weights): the message names the file/field/URL and what was expected."""
