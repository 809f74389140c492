"""Errors that are the user's to fix (a config key, a missing file), not bugs in this package.

Entry points (``pr2``, ``examples/train.py``) print such an error as one line and exit 2; any
other exception keeps its traceback, because then the traceback is what a bug report needs.
"""

from __future__ import annotations

__all__ = ["USER_ERROR_EXIT_CODE", "ConfigError", "UserError", "format_user_error"]

#: Exit status for a user error (argparse uses 2 for bad arguments too).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A bad config file, key or value. Also a ``ValueError``, which is what callers that
    validate configs have always caught."""


def format_user_error(prog: str, err: UserError) -> str:
    """The one line an entry point prints for ``err``."""
    return f"{prog}: error: {err}"
