"""Replay metrics: how far replayed routes are from what the live router would choose.

Counts accumulate on the router's device without host syncs; :func:`summarize` turns the
reduced counts into NeMo-RL-style named metrics.
"""

from __future__ import annotations

import torch

# Layout of one router's counter vector.
TOKENS, OVERLAP, DEV0, DEV1, DEV2, DEV_GE3, FALLBACK_TOKENS = range(7)
NUM_COUNTERS = 7

METRIC_PREFIX = "router_replay"


def new_counters(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)


@torch.no_grad()
def accumulate(
    counters: torch.Tensor,
    replayed: torch.Tensor,
    live: torch.Tensor,
    fallback_rows: torch.Tensor | None,
    padding_rows: torch.Tensor | None = None,
) -> None:
    """Add one router call to ``counters`` (device ops only: no host sync).

    Args:
        replayed: ``[T, k]`` expert ids actually used (fallback rows already filled live).
        live: ``[T, k]`` the live router's top-k for the same tokens.
        fallback_rows: ``[T]`` bool, rows that used the live router; excluded from agreement.
        padding_rows: ``[T]`` bool, padding tokens (negative token keys); excluded entirely.
    """
    topk = replayed.shape[1]
    # |replayed ∩ live| per token from the k x k id pairs (cheaper than a [T, E] map).
    overlap = (replayed.unsqueeze(2) == live.unsqueeze(1)).any(dim=2).sum(dim=1)
    deviation = (topk - overlap).clamp_(max=3)
    real = None if padding_rows is None else ~padding_rows
    if fallback_rows is None:
        weight = torch.ones_like(overlap) if real is None else real.to(overlap.dtype)
    else:
        counted_fallback = fallback_rows if real is None else fallback_rows & real
        weight = (~fallback_rows if real is None else ~fallback_rows & real).to(overlap.dtype)
        counters[FALLBACK_TOKENS] += counted_fallback.sum()
    counters[TOKENS] += weight.sum()
    counters[OVERLAP] += (overlap * weight).sum()
    counters[DEV0 : DEV_GE3 + 1].scatter_add_(0, deviation, weight)


def summarize(per_layer: dict[int, torch.Tensor], topk: int) -> dict[str, float]:
    """Per-layer and layer-averaged metrics from (already reduced) counters.

    Names: ``router_replay/{replay_agreement, zero_deviation_ratio, topk_deviation_{0,1,2,ge3},
    fallback_tokens, tokens}`` and the same with ``/layer_{n}`` per layer (1-based layer number).
    """
    out: dict[str, float] = {}
    if not per_layer:
        return out
    totals = torch.stack([c.double().cpu() for c in per_layer.values()]).sum(dim=0)

    def named(c: torch.Tensor, suffix: str) -> dict[str, float]:
        tokens = float(c[TOKENS])
        denom = max(tokens, 1.0)
        return {
            f"{METRIC_PREFIX}/replay_agreement{suffix}": float(c[OVERLAP]) / (denom * topk),
            f"{METRIC_PREFIX}/zero_deviation_ratio{suffix}": float(c[DEV0]) / denom,
            f"{METRIC_PREFIX}/topk_deviation_0{suffix}": float(c[DEV0]) / denom,
            f"{METRIC_PREFIX}/topk_deviation_1{suffix}": float(c[DEV1]) / denom,
            f"{METRIC_PREFIX}/topk_deviation_2{suffix}": float(c[DEV2]) / denom,
            f"{METRIC_PREFIX}/topk_deviation_ge3{suffix}": float(c[DEV_GE3]) / denom,
            f"{METRIC_PREFIX}/fallback_tokens{suffix}": float(c[FALLBACK_TOKENS]),
            f"{METRIC_PREFIX}/tokens{suffix}": tokens,
        }

    out.update(named(totals, ""))
    for layer, c in sorted(per_layer.items()):
        out.update(named(c.double().cpu(), f"/layer_{layer}"))
    return out
