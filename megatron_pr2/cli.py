"""``pr2``: the project's command line. Each subcommand lives in ``megatron_pr2.commands``."""

from __future__ import annotations

import argparse
import importlib

from megatron_pr2 import __version__
from megatron_pr2.commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pr2", description="megatron-pr2 command line")
    parser.add_argument("--version", action="version", version=f"megatron-pr2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.handler(args) or 0)
