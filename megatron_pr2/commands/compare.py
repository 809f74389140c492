"""``pr2 compare RUN_DIR... [--out DIR]``: a markdown table and a PNG figure of runs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare runs (metrics.jsonl): markdown table + PNG figure"
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (logger.log_dir of each run)")
    parser.add_argument("--out", default="comparison", help="output directory")
    parser.add_argument(
        "--label-by",
        choices=("mode", "dir"),
        default="mode",
        help="group runs by replay mode (config.json) or by directory name",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megatron_pr2.rl.compare import compare_runs

    table, figure = compare_runs(args.run_dirs, args.out, label_by=args.label_by)
    print(table.read_text())
    print(f"wrote {table} and {figure}")
    return 0
