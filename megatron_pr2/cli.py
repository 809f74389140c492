"""``pr2``: the project's command line."""

from __future__ import annotations

import argparse

from megatron_pr2 import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pr2", description="megatron-pr2 command line")
    parser.add_argument("--version", action="version", version=f"megatron-pr2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and the tested megatron-core versions")
    args = parser.parse_args(argv)
    if args.command == "info":
        from megatron_pr2.patch.version import TESTED_VERSIONS, megatron_core_version

        tested = ", ".join(str(v) for v in TESTED_VERSIONS)
        print(f"megatron-pr2 {__version__}")
        print(f"megatron-core {megatron_core_version()} (tested: {tested})")
