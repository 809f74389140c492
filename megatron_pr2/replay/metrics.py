"""Replay metrics: how far replayed routes are from what the live router would choose.

Counts accumulate on the router's device without host syncs; :func:`summarize` turns the
reduced counts into NeMo-RL-style named metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

METRIC_PREFIX = "router_replay"


def num_counters(topk: int) -> int:
    """Length of one router's counter vector: ``topk + 1`` overlap bins, then fallback tokens.

    Slot ``j <= topk`` counts tokens whose replayed set shares ``j`` experts with the live top-k
    (fallback and padding rows excluded); slot ``topk + 1`` counts fallback rows. Every metric
    derives from this histogram, so a router call adds to it with one ``scatter_add_``.
    """
    return topk + 2


def new_counters(topk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(num_counters(topk), dtype=torch.int64, device=device)


def accumulate(
    counters: torch.Tensor,
    replayed: torch.Tensor,
    live: torch.Tensor,
    fallback_rows: torch.Tensor | None,
    padding_rows: torch.Tensor | None = None,
) -> None:
    """Add one router call to ``counters`` (device ops only: no host sync). Every input is an
    integer or bool tensor, so no autograd history is built and no ``no_grad`` is needed.

    Args:
        replayed: ``[T, k]`` expert ids actually used (fallback rows already filled live).
        live: ``[T, k]`` the live router's top-k for the same tokens.
        fallback_rows: ``[T]`` bool, rows that used the live router; excluded from agreement.
        padding_rows: ``[T]`` bool, padding tokens (negative token keys); excluded entirely.
    """
    # |replayed ∩ live| per token from the k x k id pairs (ids within a row are distinct: routes
    # are validated, top-k picks distinct experts), cheaper than a [T, E] map.
    overlap = (replayed[:, :, None] == live[:, None, :]).sum(dim=(1, 2))
    if fallback_rows is None and padding_rows is None:  # the common path
        counters.scatter_add_(0, overlap, torch.ones_like(overlap))
        return
    real = None if padding_rows is None else ~padding_rows
    if fallback_rows is None:
        weight = real
    else:
        counted_fallback = fallback_rows if real is None else fallback_rows & real
        weight = ~fallback_rows if real is None else ~fallback_rows & real
        counters[-1] += counted_fallback.sum()
    counters.scatter_add_(0, overlap, weight.to(overlap.dtype))


def counts(c: torch.Tensor | Sequence[float], topk: int) -> dict[str, float]:
    """Token counts of one counter vector: tokens measured, overlap sum, deviation bins.

    Plain Python on the host values: a metrics call reads each counter vector once
    (``tolist``) instead of running a dozen small torch ops per layer."""
    values = c.tolist() if isinstance(c, torch.Tensor) else c
    hist = [float(v) for v in values[: topk + 1]]  # hist[j]: tokens sharing j experts
    deviation = hist[::-1]  # deviation d = topk - overlap
    return {
        "tokens": sum(hist),
        "overlap": sum(j * n for j, n in enumerate(hist)),
        "dev0": deviation[0],
        "dev1": deviation[1],
        "dev2": deviation[2] if topk >= 2 else 0.0,
        "dev_ge3": sum(deviation[3:]),
        "fallback": float(values[topk + 1]),
    }


def summarize(
    per_layer: Mapping[int, torch.Tensor | Sequence[float]], topk: int
) -> dict[str, float]:
    """Per-layer and layer-averaged metrics from (already reduced) counters.

    Names: ``router_replay/{replay_agreement, zero_deviation_ratio, topk_deviation_{0,1,2,ge3},
    fallback_tokens, tokens}`` and the same with ``/layer_{n}`` per layer (1-based layer number).
    """
    out: dict[str, float] = {}
    if not per_layer:
        return out
    rows = {
        layer: c.tolist() if isinstance(c, torch.Tensor) else list(c)
        for layer, c in per_layer.items()
    }
    totals = [sum(column) for column in zip(*rows.values())]

    def named(c: Sequence[float], suffix: str) -> dict[str, float]:
        n = counts(c, topk)
        out = {
            f"{METRIC_PREFIX}/fallback_tokens{suffix}": n["fallback"],
            f"{METRIC_PREFIX}/tokens{suffix}": n["tokens"],
        }
        if n["tokens"] == 0:  # only fallback rows: no agreement was measured, report none
            return out
        tokens = n["tokens"]
        return {
            f"{METRIC_PREFIX}/replay_agreement{suffix}": n["overlap"] / (tokens * topk),
            f"{METRIC_PREFIX}/zero_deviation_ratio{suffix}": n["dev0"] / tokens,
            f"{METRIC_PREFIX}/topk_deviation_0{suffix}": n["dev0"] / tokens,
            f"{METRIC_PREFIX}/topk_deviation_1{suffix}": n["dev1"] / tokens,
            f"{METRIC_PREFIX}/topk_deviation_2{suffix}": n["dev2"] / tokens,
            f"{METRIC_PREFIX}/topk_deviation_ge3{suffix}": n["dev_ge3"] / tokens,
            **out,
        }

    out.update(named(totals, ""))
    for layer, c in sorted(rows.items()):
        out.update(named(c, f"/layer_{layer}"))
    return out
