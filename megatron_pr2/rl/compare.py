"""``pr2 compare``: runs side by side, as a markdown table and a PNG figure.

Runs are grouped by a label (default: the run's replay mode from its ``config.json``), and each
number in the table is the mean over the group's runs (seeds) with the standard deviation across
them. All numbers come from the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pr2.errors import RunDirError
from megatron_pr2.rl.logger import read_metrics

__all__ = ["RunSummary", "compare_runs", "load_run", "markdown_table", "plot_runs"]

ZERO_DEV = "train/router_replay/zero_deviation_ratio"
MODE_ORDER = ("none", "r2", "r3", "pr2", "pr2_r3")
FINAL_WINDOW = 5  # "final reward" = mean reward of the last 5 steps

# (column, metric, how): "mean" over steps, "final" over the last FINAL_WINDOW steps, "last"
# the last step that has it (validation runs every grpo.val_period steps).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("final reward", "train/reward", "final"),
    ("reward AUC", "train/reward", "mean"),
    ("ratio std", "train/probs_ratio_std", "mean"),
    ("clip frac low", "train/clip_fraction_low", "mean"),
    ("clip frac high", "train/clip_fraction_high", "mean"),
    ("gen-train KL", "train/gen_kl_error", "mean"),
    ("token mult prob err", "train/token_mult_prob_error", "mean"),
    ("pred. top-k acc", "train/pr2/predictive_topk_accuracy", "mean"),
    ("val. accuracy", "validation/accuracy", "last"),
)


@dataclass
class RunSummary:
    path: Path
    label: str
    steps: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, name: str) -> list[float]:
        return [float(s[name]) if name in s else math.nan for s in self.steps]

    def num_mini_steps(self) -> int:
        return int(self.config.get("grpo", {}).get("off_policy_steps", 0)) or max(
            (
                int(k.rsplit("_", 1)[1]) + 1
                for s in self.steps
                for k in s
                if k.startswith(ZERO_DEV + "/mini_step_")
            ),
            default=0,
        )


def load_run(path: str | Path, label_by: str = "mode") -> RunSummary:
    """Read a run directory; ``label_by``: ``mode`` (config's replay mode) or ``dir`` (name)."""
    path = Path(path)
    steps = read_metrics(path)
    if not steps:
        raise RunDirError(f"{path}: metrics.jsonl holds no step")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if label_by == "mode":
        label = config.get("policy", {}).get("router_replay", {}).get("mode")
        if label is None:
            raise RunDirError(
                f"{path}: no config.json with policy.router_replay.mode; use --label-by dir"
            )
    elif label_by == "dir":
        label = path.name
    else:
        raise ValueError(f"label_by must be 'mode' or 'dir', got {label_by!r}")
    return RunSummary(path, str(label), steps, config)


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _per_run(run: RunSummary, metric: str, how: str) -> float:
    values = run.series(metric)
    if how == "final":
        values = values[-FINAL_WINDOW:]
    elif how == "last":
        values = [v for v in values if math.isfinite(v)][-1:]
    return _finite_mean(values)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "–"

    def num(x: float) -> str:  # 4 decimals, or 3 significant digits for small values
        return f"{x:.4f}" if x == 0 or abs(x) >= 0.01 else f"{x:.3g}"

    return num(mean) if n < 2 else f"{num(mean)} ± {num(std)}"


def _groups(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    order = {mode: i for i, mode in enumerate(MODE_ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """Two tables: the run-level columns, and the zero-deviation ratio per mini-step."""
    groups = _groups(runs)
    header = ["run", "n", *[c[0] for c in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, members in groups.items():
        cells = [label, str(len(members))]
        for _, metric, how in COLUMNS:
            cells.append(
                _fmt(*_mean_std([_per_run(r, metric, how) for r in members]), len(members))
            )
        lines.append("| " + " | ".join(cells) + " |")
    kappa = max(r.num_mini_steps() for r in runs)
    if kappa:
        lines += [
            "",
            "Zero-deviation ratio per mini-step (share of tokens whose replayed or, under "
            "`none`, old-pass expert set equals the live router's), mean over steps:",
            "",
        ]
        head = ["run", *[f"mini-step {i}" for i in range(kappa)]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, members in groups.items():
            cells = [label]
            for i in range(kappa):
                metric = f"{ZERO_DEV}/mini_step_{i}"
                cells.append(
                    _fmt(*_mean_std([_per_run(r, metric, "mean") for r in members]), len(members))
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _smoothed(values: Sequence[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        out.append(_finite_mean(values[max(0, i - window + 1) : i + 1]))
    return out


def _group_curve(members: Sequence[RunSummary], metric: str) -> list[float]:
    length = min(len(r.steps) for r in members)
    return [_finite_mean([r.series(metric)[i] for r in members]) for i in range(length)]


def plot_runs(runs: Sequence[RunSummary], path: str | Path) -> None:
    """A 2 x 3 figure: reward, zero-deviation per mini-step, ratio std, clip fraction,
    gen-train KL and predictive top-k accuracy (group means; curves smoothed over 5 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(runs)
    color = {label: f"C{i}" for i, label in enumerate(groups)}  # one colour per run group
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    curves = (
        (axes[0, 0], "train/reward", "reward"),
        (axes[0, 2], "train/probs_ratio_std", "importance ratio std"),
        (axes[1, 0], "train/clip_fraction_high", "clip fraction (high)"),
        (axes[1, 1], "train/gen_kl_error", "gen-train KL"),
        (axes[1, 2], "train/pr2/predictive_topk_accuracy", "predictive top-k accuracy"),
    )
    for ax, metric, title in curves:
        for label, members in groups.items():
            curve = _group_curve(members, metric)
            if any(math.isfinite(v) for v in curve):
                ax.plot(range(1, len(curve) + 1), _smoothed(curve), label=label, color=color[label])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[0, 1]
    kappa = max(r.num_mini_steps() for r in runs)
    for label, members in groups.items():
        means = [
            _mean_std([_per_run(r, f"{ZERO_DEV}/mini_step_{i}", "mean") for r in members])[0]
            for i in range(kappa)
        ]
        if any(math.isfinite(v) for v in means):
            ax.plot(range(kappa), means, marker="o", label=label, color=color[label])
    ax.set_title("zero-deviation ratio per mini-step")
    ax.set_xlabel("mini-step")
    ax.set_xticks(range(kappa))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(
    run_dirs: Sequence[str | Path], out_dir: str | Path, label_by: str = "mode"
) -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` under ``out_dir``; returns their paths."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    runs = [load_run(p, label_by) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, figure = out / "comparison.md", out / "comparison.png"
    table.write_text(markdown_table(runs))
    plot_runs(runs, figure)
    return table, figure
