"""Errors that are the user's to fix (a config key, a missing file), not bugs in this package.

Entry points (``pr2``, ``examples/train.py``) print such an error as one line and exit 2; any
other exception keeps its traceback, because then the traceback is what a bug report needs.
"""

from __future__ import annotations

__all__ = [
    "USER_ERROR_EXIT_CODE",
    "ConfigError",
    "MissingRunFileError",
    "RunDirError",
    "UserError",
    "format_user_error",
]

#: Exit status for a user error (argparse uses 2 for bad arguments too).
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A bad config file, key or value. Also a ``ValueError``, which is what callers that
    validate configs have always caught."""


class RunDirError(UserError, ValueError):
    """A directory given as a run (``pr2 compare``, ``pr2 analyze``) whose files do not hold
    what a run writes (no step, a corrupt line, no replay mode)."""


class MissingRunFileError(UserError, FileNotFoundError):
    """A run directory without a file the command reads (``metrics.jsonl``, route traces)."""


def format_user_error(prog: str, err: UserError) -> str:
    """The one line an entry point prints for ``err``."""
    return f"{prog}: error: {err}"
