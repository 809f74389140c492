"""``pr2 analyze``: read a run's route traces (``rl.traces``) and report how routes move.

Per step, layer and mini-step ``i`` (the horizon: ``i`` optimizer updates after the old-log-prob
pass) the tokens of mini-batch ``i`` are joined by key with the old pass, and three top-k
agreements (|A ∩ B| / k, and the share of tokens with A == B, the zero-deviation ratio) are
measured against the live router at that horizon:

* ``replayed``: the experts the update pass used (what the replay metrics report);
* ``recorded``: the old pass's route (r2: the old live route; pr2: the *predicted* route;
  r3: the rollout engine's route) - the paper's predictive top-k accuracy vs horizon;
* ``stale``: the old pass's own live top-k - what R2 would have replayed (no prediction).

Also each layer's router drift per step (relative change of its weight over the step's updates),
and, from the drift probe (``logger.drift_probe_tokens``, ``rl.drift``), whether that drift is
systematic: cosines of consecutive router-logit changes on fixed tokens and of consecutive
router-weight updates. Either input alone is enough. Outputs ``analysis.md`` and PNG figures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_pr2.errors import MissingRunFileError
from megatron_pr2.replay.session import RouteTrace
from megatron_pr2.rl import drift
from megatron_pr2.rl.traces import StepTrace, read_step_trace

__all__ = ["HorizonStats", "analyze_run", "horizon_stats", "join_by_key", "load_traces"]

KINDS = ("replayed", "recorded", "stale")


@dataclass
class HorizonStats:
    """Sums for one (kind, layer, mini-step) cell over steps: overlap / (tokens * k) is the
    agreement, equal / tokens the zero-deviation ratio."""

    overlap: float = 0.0
    equal: float = 0.0
    tokens: int = 0
    topk: int = 1

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.numel() == 0:
            return
        self.topk = a.shape[1]
        self.overlap += float((a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum())
        self.equal += float((a.sort(dim=1).values == b.sort(dim=1).values).all(dim=1).sum())
        self.tokens += a.shape[0]

    @property
    def agreement(self) -> float:
        return self.overlap / (self.tokens * self.topk) if self.tokens else float("nan")

    @property
    def zero_deviation(self) -> float:
        return self.equal / self.tokens if self.tokens else float("nan")


def load_traces(run_dir: str | Path, required: bool = True) -> list[StepTrace]:
    files = sorted((Path(run_dir) / "traces").glob("step_*.safetensors"))
    if not files and required:
        raise MissingRunFileError(
            f"{run_dir}: no traces/step_*.safetensors (run the trainer with logger.route_traces=true)"
        )
    return [read_step_trace(f) for f in files]


def join_by_key(old: RouteTrace, later: RouteTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``old`` and ``later`` holding the same (non-padding) token, matched by key."""
    keep = later.keys >= 0
    keys = later.keys[keep]
    later_rows = keep.nonzero().flatten()
    order = torch.argsort(old.keys)
    sorted_keys = old.keys[order]
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=max(len(sorted_keys) - 1, 0))
    found = (
        sorted_keys[pos] == keys if len(sorted_keys) else torch.zeros_like(keys, dtype=torch.bool)
    )
    return order[pos[found]], later_rows[found]


def horizon_stats(traces: list[StepTrace]) -> dict[str, dict[tuple[int, int], HorizonStats]]:
    """``{kind: {(layer, mini_step): HorizonStats}}`` summed over the steps."""
    stats: dict[str, dict[tuple[int, int], HorizonStats]] = {
        k: defaultdict(HorizonStats) for k in KINDS
    }
    for trace in traces:
        for i, per_layer in enumerate(trace.mini_steps):
            for layer, later in per_layer.items():
                stats["replayed"][(layer, i)].add(
                    later.used[later.keys >= 0], later.live[later.keys >= 0]
                )
                old = trace.old.get(layer)
                if old is None:
                    continue
                old_rows, later_rows = join_by_key(old, later)
                live = later.live[later_rows]
                stats["recorded"][(layer, i)].add(old.used[old_rows], live)
                stats["stale"][(layer, i)].add(old.live[old_rows], live)
    return stats


def _per_horizon(cells: dict[tuple[int, int], HorizonStats], kappa: int) -> list[HorizonStats]:
    out = [HorizonStats() for _ in range(kappa)]
    for (_, i), cell in cells.items():
        out[i].overlap += cell.overlap
        out[i].equal += cell.equal
        out[i].tokens += cell.tokens
        out[i].topk = cell.topk
    return out


def _report(run_dir: Path, traces: list[StepTrace], stats) -> str:
    first = traces[0]
    kappa = first.num_mini_steps
    layers = sorted({layer for t in traces for layer in t.layers})
    lines = [
        f"# Route analysis: `{run_dir}`",
        "",
        f"mode `{first.mode}`, {len(traces)} steps (steps {traces[0].step}-{traces[-1].step}), "
        f"{len(layers)} MoE layers, top-{first.topk} of {first.num_experts} experts, "
        f"κ = {kappa}, every {first.token_stride}-th token traced.",
        "",
        "## Top-k agreement with the live router vs horizon (all layers)",
        "",
        "Horizon i = mini-step i (i updates after the old-log-prob pass). *recorded*: the old "
        "pass's route (pr2: predicted; r3: the engine's); *stale*: the old pass's own live route "
        "(what R2 replays); *replayed*: what the update pass used.",
        "",
        "| horizon | tokens | recorded agreement | recorded zero-dev | stale agreement | "
        "stale zero-dev | replayed zero-dev |",
        "|---|---|---|---|---|---|---|",
    ]
    rec, stale, rep = (_per_horizon(stats[k], kappa) for k in ("recorded", "stale", "replayed"))
    for i in range(kappa):
        lines.append(
            f"| {i} | {rec[i].tokens} | {rec[i].agreement:.4f} | {rec[i].zero_deviation:.4f} | "
            f"{stale[i].agreement:.4f} | {stale[i].zero_deviation:.4f} | {rep[i].zero_deviation:.4f} |"
        )
    lines += [
        "",
        "## Zero-deviation ratio of the recorded route per layer and horizon",
        "",
        "| layer | " + " | ".join(f"h={i}" for i in range(kappa)) + " | router drift / step |",
        "|---|" + "---|" * (kappa + 1),
    ]
    for layer in layers:
        cells = [
            f"{stats['recorded'][(layer, i)].zero_deviation:.4f}"
            if (layer, i) in stats["recorded"]
            else "–"
            for i in range(kappa)
        ]
        drifts = [t.router_drift[layer] for t in traces if layer in t.router_drift]
        mean_drift = sum(drifts) / len(drifts) if drifts else float("nan")
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {mean_drift:.2e} |")
    return "\n".join(lines) + "\n"


def _figures(out: Path, traces: list[StepTrace], stats) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappa = traces[0].num_mini_steps
    layers = sorted({layer for t in traces for layer in t.layers})
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("recorded", "o-"), ("stale", "s--")):
        per = _per_horizon(stats[kind], kappa)
        ax.plot(range(kappa), [c.agreement for c in per], style, label=f"{kind} (top-k acc.)")
    ax.set_xlabel("horizon (mini-step)")
    ax.set_ylabel("top-k agreement with live router")
    ax.set_title(f"predictive accuracy vs horizon ({traces[0].mode})")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "horizon.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in layers:
        points = [(t.step, t.router_drift[layer]) for t in traces if layer in t.router_drift]
        if points:
            ax.plot(*zip(*points), label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("||ΔW|| / ||W|| per step")
    ax.set_title("router drift per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(out / "router_drift.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in layers:
        values = [
            stats["recorded"][(layer, i)].zero_deviation
            if (layer, i) in stats["recorded"]
            else float("nan")
            for i in range(kappa)
        ]
        ax.plot(range(kappa), values, "o-", label=f"layer {layer}")
    ax.set_xlabel("horizon (mini-step)")
    ax.set_ylabel("zero-deviation ratio (recorded vs live)")
    ax.set_title("per-layer zero-deviation ratio per mini-step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(out / "zero_deviation_per_layer.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write ``analysis.md`` and the figures under ``out_dir`` (default: ``run_dir/analysis``)
    from the route traces and/or the drift probe files, whichever the run has."""
    run_dir = Path(run_dir)
    traces = load_traces(run_dir, required=False)
    probes = drift.load_drift(run_dir)
    if not traces and not probes:
        raise MissingRunFileError(
            f"{run_dir}: no traces/step_*.safetensors and no drift/step_*.safetensors (run the "
            "trainer with logger.route_traces=true and/or logger.drift_probe_tokens=N)"
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    text, figures = "", []
    if traces:
        stats = horizon_stats(traces)
        text = _report(run_dir, traces, stats)
        figures = _figures(out, traces, stats)
    else:
        text = f"# Route analysis: `{run_dir}`\n\n(no route traces: logger.route_traces=false)\n"
    if probes:
        per_layer = drift.drift_stats(probes)
        text += "\n" + "\n".join(drift.drift_report(probes, per_layer)) + "\n"
        figures.append(
            drift.drift_figure(out / "drift_cosine.png", per_layer, probes[0].adam_beta1)
        )
    report = out / "analysis.md"
    report.write_text(text)
    return report, figures
