"""Dispatch plans: the all-to-all sizes of every (MoE layer, microbatch) of a replayed pass.

Built once per rollout batch from the routes the routers will replay, with **one** all-gather
of per-(layer, microbatch) expert counts over the TP x EP group (instead of one per layer per
microbatch per forward and recompute), then reused by every update pass of that batch::

    planner = DispatchPlanner(model_chunks)      # ReplayMoELayer layers (patch.spec)
    plan = planner.build(routes)                 # collective over TP x EP, once per batch
    with planner.planning(plan), session.replaying(routes):
        forward_backward_func(...)               # no count all-gather, no host sync per layer

``routes`` must be the routes the pass replays (the same mapping given to ``replaying``); each
rank gives its own token slice's routes, as to the routers. Memory: ``O(layers x microbatches x
(experts + tp*ep*local experts))`` integers per rank, far below the routes themselves
(``layers x microbatches x tokens x topk``).

Which microbatch a dispatcher call belongs to follows the router's rule (``replay.state``):
forwards in order, and each activation recompute re-runs the oldest forward not yet recomputed.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_pr2.patch.dispatcher import (
    PlannedAlltoAllTokenDispatcher,
    PlannedDispatcher,
    ReplayMoELayer,
)
from megatron_pr2.replay.state import PlannedRoute, in_backward_recompute
from megatron_pr2.routes.dispatch_counts import (
    DispatchTopology,
    LayerSplits,
    derive_splits,
    route_counts,
)

RouteLike = torch.Tensor | PlannedRoute | None


class MicrobatchSizes(NamedTuple):
    """Host-side dispatch sizes of one (layer, microbatch), as megatron's preprocess sets them."""

    tokens_per_local_expert: torch.Tensor  # [nle] int64, CPU
    input_splits: np.ndarray  # [ep]
    output_splits: np.ndarray  # [ep]
    output_splits_tp: np.ndarray  # [tp]
    global_tokens_per_local_expert: torch.Tensor  # [tp*ep, nle] int64, on permute_idx_device
    local_counts: np.ndarray  # [E] this rank's own tokens per expert (for verification)
    received_tokens: int  # tokens the local experts get from the whole group (all-gather)
    capacity: int | None  # padded dispatch: tokens per (rank, expert) slot; None: dropless


class DispatchSlot:
    """One layer's plan for one pass: which microbatch each dispatcher call is."""

    def __init__(
        self,
        layer: int,
        splits: LayerSplits,
        verify: bool = False,
        sort_device: torch.device | str = "cpu",
        padded: bool = False,
    ) -> None:
        self.layer = layer
        self.splits = splits
        self.verify = verify
        self.padded = padded
        # megatron's fused permute sorts with split sizes on the GPU: one copy per layer per
        # pass instead of one per call.
        self._global_per_local = splits.global_tokens_per_local_expert.to(sort_device)
        self._cursor = 0
        # Decisions of this pass's forwards, in order: a recompute repeats its forward's.
        self._recompute_queue: deque[MicrobatchSizes | str] = deque()

    def next_sizes(
        self, num_tokens: int, router_replays: bool, padding_mask_given: bool
    ) -> MicrobatchSizes | str:
        """The sizes of this call, or why megatron's own path must run (a metric key). Every
        rank of the TP x EP group reaches the same answer (megatron's path is a collective)."""
        if in_backward_recompute():
            if not self._recompute_queue:
                raise RuntimeError(
                    f"layer {self.layer}: dispatch recompute without a matching forward"
                )
            return self._recompute_queue.popleft()
        microbatch = self._cursor
        self._cursor += 1
        choice = self._decide(microbatch, num_tokens, router_replays, padding_mask_given)
        self._recompute_queue.append(choice)
        return choice

    def _decide(
        self, microbatch: int, num_tokens: int, router_replays: bool, padding_mask_given: bool
    ) -> MicrobatchSizes | str:
        splits = self.splits
        if microbatch >= splits.num_microbatches:
            return "microbatch_not_planned"
        if not splits.planned[microbatch]:
            return "partial_routes"  # no routes or -1 rows on some rank of the group
        if not router_replays:
            return "router_live"
        if padding_mask_given:
            return "padding_mask"
        if splits.num_tokens[microbatch] != num_tokens:
            raise ValueError(
                f"dispatch plan for layer {self.layer}, microbatch {microbatch}: planned "
                f"{splits.num_tokens[microbatch]} tokens, the router saw {num_tokens}; build "
                "the plan from the routes this pass replays"
            )
        return MicrobatchSizes(
            splits.tokens_per_local_expert[microbatch],
            splits.input_splits[microbatch],
            splits.output_splits[microbatch],
            splits.output_splits_tp[microbatch],
            self._global_per_local[microbatch],
            splits.local_counts[microbatch],
            int(splits.received_tokens[microbatch]),
            max(int(splits.max_count[microbatch]), 1) if self.padded else None,
        )

    def check_counts(self, routing_map: torch.Tensor, sizes: MicrobatchSizes) -> None:
        """Debug check (a host sync): the routing map's counts are the planned ones."""
        actual = routing_map.sum(dim=0).long().cpu().numpy()
        if not np.array_equal(actual, sizes.local_counts):
            raise RuntimeError(
                f"layer {self.layer}: routing map counts {actual.tolist()} differ from the "
                f"dispatch plan's {sizes.local_counts.tolist()}"
            )


class DispatchPlan:
    """Dispatch sizes of every local MoE layer for every microbatch of a rollout batch."""

    def __init__(self, layers: Mapping[int, LayerSplits]) -> None:
        self.layers = dict(layers)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers.values())

    def select(self, microbatches: slice) -> DispatchPlan:
        """The plan of some microbatches (views, no copy): one plan per rollout batch serves
        every mini-step, each replaying its own slice of the batch's routes."""
        return DispatchPlan({layer: s.select(microbatches) for layer, s in self.layers.items()})

    def planned_fraction(self) -> float:
        total = sum(s.num_microbatches for s in self.layers.values())
        return sum(int(s.planned.sum()) for s in self.layers.values()) / max(total, 1)


def _route_tensor(route: RouteLike) -> tuple[torch.Tensor | None, bool | None, int]:
    """(indices, has fallback rows if known on the host, rows)."""
    if route is None:
        return None, True, -1
    if isinstance(route, PlannedRoute):
        return route.indices, route.fallback_rows is not None, route.num_rows
    return route, None, int(route.shape[0])


class DispatchPlanner:
    """The planned dispatchers of one rank's model chunks, keyed by global layer number."""

    def __init__(self, model: torch.nn.Module | Iterable[torch.nn.Module]) -> None:
        chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
        self._dispatchers: dict[int, PlannedDispatcher] = {}
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, ReplayMoELayer) and module.planned_dispatcher is not None:
                    if module.layer_number in self._dispatchers:
                        raise ValueError(f"two MoE layers claim layer {module.layer_number}")
                    self._dispatchers[module.layer_number] = module.planned_dispatcher
        if not self._dispatchers:
            raise ValueError(
                "no planned dispatcher in the model; build it from a spec passed through "
                "megatron_pr2.patch.spec.with_planned_dispatch, with "
                "moe_token_dispatcher_type 'alltoall' or 'allgather'"
            )
        self.layers = tuple(sorted(self._dispatchers))
        first = self._dispatchers[self.layers[0]]
        self._group = first.tp_ep_group
        self.topology = DispatchTopology(
            num_experts=first.config.num_moe_experts,
            topk=first.config.moe_router_topk,
            ep_size=first.ep_size,
            tp_size=first.tp_size,
            tp_rank=first.tp_rank,
            local_expert_start=first.local_expert_indices[0],
            num_local_experts=first.num_local_experts,
            group_rank=dist.get_rank(self._group) if first.ep_size * first.tp_size > 1 else 0,
        )

    def build(self, routes: Mapping[int, Sequence[RouteLike]]) -> DispatchPlan:
        """Plan from this rank's routes (``{layer: [route per microbatch]}``). A collective
        over the TP x EP group: every rank of it calls ``build`` for the same batch."""
        topo = self.topology
        routes = getattr(routes, "plans", routes)  # PreparedRoutes: keep its fallback flags
        num_mb = max((len(routes.get(layer, ())) for layer in self.layers), default=0)
        counts, rows = [], []
        for layer in self.layers:
            per_mb = list(routes.get(layer, ())) + [None] * (num_mb - len(routes.get(layer, ())))
            parts = [_route_tensor(r) for r in per_mb]
            counts.append(
                route_counts([p[0] for p in parts], topo.num_experts, [p[1] for p in parts])
            )
            rows.append([p[2] for p in parts])
        local = (
            torch.stack(counts) if counts else torch.empty(0, num_mb, topo.num_experts)
        ).long()  # [L, M, E]
        group_size = topo.ep_size * topo.tp_size
        if group_size > 1:
            device = "cuda" if dist.get_backend(self._group) == "nccl" else "cpu"
            local = local.to(device)
            flat = local.reshape(-1).contiguous()  # 1-D: gloo gathers along dim 0 only
            out = flat.new_empty(group_size * flat.numel())
            dist.all_gather_into_tensor(out, flat, group=self._group)
            # The one host read of the batch.
            gathered = out.view(group_size, *local.shape).cpu().numpy()
        else:
            gathered = local.cpu().numpy()[None]
        return DispatchPlan(
            {
                layer: derive_splits(gathered[:, i], np.asarray(rows[i]), topo)
                for i, layer in enumerate(self.layers)
            }
        )

    @contextlib.contextmanager
    def planning(
        self, plan: DispatchPlan, verify: bool = False, padded: bool = False
    ) -> Iterator[None]:
        """Dispatchers use ``plan`` for one pass; ``verify`` checks every planned call's counts
        against the routing map (a host sync per call: tests and debugging only).

        ``padded`` (all-to-all only): megatron's fixed-shape drop-and-pad dispatch with the
        capacity of each (layer, microbatch) set to the plan's largest count per (rank,
        expert), so nothing is dropped: no capacity factor, and every rank sends every expert
        the same number of rows (equal all-to-all splits)."""
        missing = [layer for layer in self.layers if layer not in plan.layers]
        if missing:
            raise ValueError(f"dispatch plan has no layer(s) {missing}")
        if padded and not all(
            isinstance(d, PlannedAlltoAllTokenDispatcher) for d in self._dispatchers.values()
        ):
            raise ValueError(
                "padded dispatch needs the all-to-all dispatcher (megatron's "
                "all-gather dispatcher has no drop-and-pad mode)"
            )
        for layer, dispatcher in self._dispatchers.items():
            # all-to-all: megatron sorts on permute_idx_device; all-gather: sizes stay on the host
            device = getattr(dispatcher, "permute_idx_device", None) or "cpu"
            dispatcher.dispatch_slot = DispatchSlot(
                layer, plan.layers[layer], verify, device, padded
            )
        try:
            yield
        finally:
            for dispatcher in self._dispatchers.values():
                dispatcher.dispatch_slot = None

    def take_stats(self) -> dict[str, int]:
        """Dispatcher calls since the last take: ``planned`` and each fallback reason."""
        total: Counter[str] = Counter()
        for dispatcher in self._dispatchers.values():
            total.update(dispatcher.plan_stats)
            dispatcher.plan_stats.clear()
        return {f"dispatch/{key}": value for key, value in sorted(total.items())}
