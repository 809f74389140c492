"""``pr2 analyze RUN_DIR [--out DIR]``: route traces -> markdown report + PNG figures."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="per-layer agreement, router drift (and its structure) and accuracy vs horizon",
    )
    parser.add_argument(
        "run_dir",
        help="a run directory written with logger.route_traces=true and/or "
        "logger.drift_probe_tokens=N",
    )
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megatron_pr2.rl.analyze import analyze_run

    report, figures = analyze_run(args.run_dir, args.out)
    print(report.read_text())
    print("wrote " + ", ".join(str(p) for p in [report, *figures]))
    return 0
