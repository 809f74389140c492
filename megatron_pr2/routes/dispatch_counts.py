"""Token-dispatch sizes derived from known routes, once per rollout batch instead of per layer.

megatron-core's all-to-all dispatcher learns, in every MoE layer of every forward and recompute,
how many tokens each rank sends to each expert: ``routing_map.sum(0)``, an all-gather of those
counts over the TP x EP group, a device-to-host copy and a stream synchronisation. Under replay
the routes of the whole pass are known before it starts, so the same numbers follow from the
routes: this module computes them (pure torch/numpy, no process group).

Counts of one rank: ``[layers, microbatches, experts]`` tokens per *global* expert id from this
rank's own token slice (a -1 row everywhere = the microbatch cannot be planned: no routes, or
some rows fall back to the live router). The dispatch sizes of a rank need the counts of every
rank of its TP x EP group (what the others send to its local experts): the caller all-gathers
the count arrays once (``replay.dispatch_plan``) and :func:`derive_splits` does the rest,
exactly as megatron's ``MoEAlltoAllTokenDispatcher.preprocess`` would per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

UNPLANNED = -1  # count-row marker: this (layer, microbatch) uses megatron's own path


@dataclass(frozen=True)
class DispatchTopology:
    """What megatron's all-to-all dispatcher knows about its groups (expert TP = its ``tp``)."""

    num_experts: int
    topk: int
    ep_size: int
    tp_size: int
    tp_rank: int
    local_expert_start: int
    num_local_experts: int
    group_rank: int  # this rank's index in the TP x EP group (TP fastest, as megatron gathers)


def route_counts(
    routes: Sequence[torch.Tensor | None], num_experts: int, has_fallback: Sequence[bool | None]
) -> torch.Tensor:
    """``[microbatches, experts]`` tokens per expert of one layer's routes (``[tokens, topk]``
    global expert ids), computed where the routes live (no host sync). A microbatch with no
    routes, or with a -1 (live fallback) row, gets an all-``UNPLANNED`` row. ``has_fallback``:
    per microbatch True/False when already known on the host, None = look at the tensor."""
    device = next((r.device for r in routes if r is not None), torch.device("cpu"))
    rows = []
    for indices, fallback in zip(routes, has_fallback, strict=True):
        if indices is None or fallback:
            rows.append(torch.full((num_experts,), UNPLANNED, dtype=torch.int64, device=device))
            continue
        # Shift by one so -1 (fallback) lands in bin 0: one kernel counts both.
        shifted = torch.bincount(indices.reshape(-1) + 1, minlength=num_experts + 1)
        counts = shifted[1:]
        if fallback is None:
            counts = torch.where(shifted[0] > 0, torch.full_like(counts, UNPLANNED), counts)
        rows.append(counts)
    if not rows:
        return torch.empty((0, num_experts), dtype=torch.int64, device=device)
    return torch.stack(rows)


@dataclass(frozen=True)
class LayerSplits:
    """Dispatch sizes of one MoE layer on this rank, per microbatch (host memory).

    Shapes (M microbatches, ep/tp of the dispatcher, nle local experts, E experts):
    ``planned [M]``; ``input_splits``/``output_splits`` ``[M, ep]``; ``output_splits_tp``
    ``[M, tp]``; ``tokens_per_local_expert`` ``[M, nle]``; ``global_tokens_per_local_expert``
    ``[M, tp*ep, nle]``; ``local_counts`` ``[M, E]`` (this rank's own, for verification);
    ``num_tokens`` the router rows per microbatch (-1 when unknown); ``received_tokens [M]``
    the tokens of the whole group for this rank's local experts (the all-gather dispatcher's
    permute size); ``max_count [M]`` the most tokens any rank of the group sends any expert
    (the zero-drop capacity of a padded dispatch: the same on every rank of the group).
    """

    planned: np.ndarray
    num_tokens: np.ndarray
    input_splits: np.ndarray
    output_splits: np.ndarray
    output_splits_tp: np.ndarray
    tokens_per_local_expert: torch.Tensor
    global_tokens_per_local_expert: torch.Tensor
    local_counts: np.ndarray
    received_tokens: np.ndarray
    max_count: np.ndarray

    @property
    def num_microbatches(self) -> int:
        return len(self.planned)

    def select(self, microbatches: slice) -> LayerSplits:
        """The sizes of some microbatches (views): a mini-step's part of a rollout batch."""
        return LayerSplits(*(getattr(self, f.name)[microbatches] for f in dataclasses.fields(self)))

    @property
    def nbytes(self) -> int:
        arrays = (
            self.input_splits,
            self.output_splits,
            self.output_splits_tp,
            self.local_counts,
            self.received_tokens,
            self.max_count,
        )
        tensors = (self.tokens_per_local_expert, self.global_tokens_per_local_expert)
        return sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors)


def derive_splits(
    gathered: np.ndarray, num_tokens: np.ndarray, topology: DispatchTopology
) -> LayerSplits:
    """Dispatch sizes of one layer from the counts of every rank of the TP x EP group.

    ``gathered``: ``[tp*ep, M, E]`` in group-rank order (TP fastest), ``UNPLANNED`` rows where a
    rank cannot plan that microbatch: then no rank of the group plans it, so all of them take
    megatron's path (its count all-gather is a collective: all must call it or none).
    """
    t = topology
    group, microbatches, experts = gathered.shape
    if group != t.ep_size * t.tp_size or experts != t.num_experts:
        raise ValueError(
            f"counts of {group} ranks x {experts} experts for a TP{t.tp_size} x EP{t.ep_size} "
            f"group with {t.num_experts} experts"
        )
    planned = (gathered >= 0).all(axis=(0, 2))
    counts = np.where(planned[None, :, None], gathered, 0).astype(np.int64)
    mine = counts[t.group_rank]  # [M, E]
    # [ep, tp, M, E] -> [tp, ep, M, E], as megatron's reshape(ep, tp, E).transpose(0, 1).
    per_rank = counts.reshape(t.ep_size, t.tp_size, microbatches, experts).transpose(1, 0, 2, 3)
    lo, hi = t.local_expert_start, t.local_expert_start + t.num_local_experts
    local = per_rank[..., lo:hi]  # [tp, ep, M, nle]
    tokens_per_rank = local.sum(axis=3)  # [tp, ep, M]
    global_per_local = local.transpose(2, 0, 1, 3).reshape(microbatches, group, hi - lo)
    return LayerSplits(
        planned=planned,
        num_tokens=np.asarray(num_tokens, dtype=np.int64),
        input_splits=np.ascontiguousarray(
            mine.reshape(microbatches, t.ep_size, t.num_local_experts).sum(axis=2)
        ),
        output_splits=np.ascontiguousarray(tokens_per_rank[t.tp_rank].T),
        output_splits_tp=np.ascontiguousarray(tokens_per_rank.sum(axis=1).T),
        tokens_per_local_expert=torch.from_numpy(np.ascontiguousarray(local.sum(axis=(0, 1)))),
        global_tokens_per_local_expert=torch.from_numpy(np.ascontiguousarray(global_per_local)),
        local_counts=np.ascontiguousarray(mine),
        received_tokens=np.ascontiguousarray(local.sum(axis=(0, 1, 3))),
        max_count=np.ascontiguousarray(counts.max(axis=(0, 2))),
    )
