"""``key=value`` overrides anywhere on a command line, also after flags.

argparse fills a ``nargs="*"`` positional only from the words right after the preceding
positional, so ``pr2 launch R --dryrun grpo.max_num_steps=3`` would be refused as "unrecognized
arguments". The sub-parser made here moves such left-over ``dotted.key=value`` words into
``overrides`` (in command-line order); any other left-over word is still an error.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["OVERRIDE", "OverridesParser", "add_parser_with_overrides"]

#: ``a.b.c=value``: a dotted key (no leading dash, so a mistyped ``--flag=x`` stays an error).
OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[A-Za-z_][\w\-]*)*=")


class OverridesParser(argparse.ArgumentParser):
    """A parser whose ``overrides`` positional also collects ``key=value`` words after flags."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        overrides = list(getattr(parsed, "overrides", None) or [])
        rest = []
        for word in extras:
            (overrides if OVERRIDE.match(word) else rest).append(word)
        parsed.overrides = overrides
        return parsed, rest


def add_parser_with_overrides(
    subparsers: argparse._SubParsersAction, name: str, **kwargs: Any
) -> OverridesParser:
    """``subparsers.add_parser(name, **kwargs)`` as an :class:`OverridesParser`; the caller
    adds the ``overrides`` positional (``nargs="*"``) after its other positionals."""
    previous = subparsers._parser_class
    subparsers._parser_class = OverridesParser
    try:
        parser = subparsers.add_parser(name, **kwargs)
    finally:
        subparsers._parser_class = previous
    return parser
