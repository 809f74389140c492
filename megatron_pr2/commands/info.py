"""``pr2 info``: versions of this package and of megatron-core."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="print versions and the tested megatron-core versions"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megatron_pr2 import __version__
    from megatron_pr2.patch.version import TESTED_VERSIONS, megatron_core_version

    tested = ", ".join(str(v) for v in TESTED_VERSIONS)
    print(f"megatron-pr2 {__version__}")
    print(f"megatron-core {megatron_core_version()} (tested: {tested})")
    return 0
