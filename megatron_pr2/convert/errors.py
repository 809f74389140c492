"""The one exception type conversion raises, so the CLI can print it without a traceback."""

from __future__ import annotations


class ConversionError(ValueError):
    """Bad input or an impossible request; the message names the tensor, key or file."""
