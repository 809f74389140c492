"""Run a grid of GRPO configs and tabulate whether each one learns.

Every combination of the ``--grid`` values (times ``--seeds``) runs ``examples/train.py`` in its
own process; the table compares the mean reward of the first and the last ``--window`` steps.
Used to pick the synthetic evidence config's task, batch and learning rate (docs/results/sweeps/)::

    python examples/tiny/sweep.py examples/tiny/grpo_off4.yaml \
        --grid policy.lr=1e-3,3e-3 task.max_digits=1,2 --seeds 1 --out logs/sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _runs(grid: list[str], seeds: list[int]) -> list[list[str]]:
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    combos = list(itertools.product(*axes)) if axes else [()]
    return [[*combo, f"grpo.seed={seed}"] for combo in combos for seed in seeds]


def _rows(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _validation(rows: list[dict]) -> str:
    """``first -> last`` validation accuracy (grpo.val_period), or empty without validation."""
    accs = [r["validation/accuracy"] for r in rows if "validation/accuracy" in r]
    return f"{accs[0]:.3f} -> {accs[-1]:.3f}" if accs else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 axes")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1])
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--out", required=True, help="folder for runs and sweep.md")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    lines = [
        f"Base: `{args.config}` {' '.join(args.overrides)}",
        "",
        f"| run | first {args.window} | last {args.window} | gain | max | val. accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(_runs(args.grid, args.seeds)):
        log_dir = out / f"run{i:02d}"
        command = [
            sys.executable,
            str(REPO_ROOT / "examples" / "train.py"),
            args.config,
            *args.overrides,
            *run,
            f"logger.log_dir={log_dir}",
            "logger.progress_bar=false",
            "logger.tensorboard_enabled=false",
        ]
        with (out / f"run{i:02d}.log").open("w") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        name = " ".join(run)
        if result.returncode:
            lines.append(f"| {name} | failed (exit {result.returncode}) | | | | |")
            continue
        rows = _rows(log_dir / "metrics.jsonl")
        rewards = [r["train/reward"] for r in rows if "train/reward" in r]
        first = statistics.mean(rewards[: args.window])
        last = statistics.mean(rewards[-args.window :])
        lines.append(
            f"| {name} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {max(rewards):.3f} "
            f"| {_validation(rows)} |"
        )
        print(lines[-1], flush=True)
        (out / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
