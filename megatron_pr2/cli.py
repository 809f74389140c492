"""``pr2``: the project's command line. Each subcommand lives in ``megatron_pr2.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from megatron_pr2 import __version__
from megatron_pr2.commands import COMMAND_MODULES
from megatron_pr2.errors import USER_ERROR_EXIT_CODE, UserError, format_user_error

#: What megatron-core warns, once per module, on every import without TE/apex (every CPU
#: machine). It is not actionable here: megatron's torch fallbacks are what this package uses.
TE_APEX_WARNING = r"Transformer Engine and Apex are not installed"


def silence_megatron_import_warnings() -> None:
    """Drop megatron-core's TE/apex fallback notices; any other warning still shows."""
    warnings.filterwarnings("ignore", message=TE_APEX_WARNING, category=UserWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pr2", description="megatron-pr2 command line")
    parser.add_argument("--version", action="version", version=f"megatron-pr2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. A :class:`UserError` (bad config, missing file) is one line on stderr
    and exit status 2; other exceptions are bugs and keep their traceback."""
    silence_megatron_import_warnings()
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args) or 0
    except UserError as err:
        print(format_user_error("pr2", err), file=sys.stderr)
        code = USER_ERROR_EXIT_CODE
    raise SystemExit(code)
