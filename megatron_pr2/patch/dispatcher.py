"""Patch point 3: megatron's all-to-all token dispatcher takes its sizes from a replay plan.

``MoEAlltoAllTokenDispatcher.preprocess`` derives the tokens per expert and the all-to-all split
sizes of every call from the routing map: a count all-gather over the TP x EP group, then a
device-to-host copy and a stream synchronisation before the all-to-all can be issued. Under
replay the routes are known before the pass, so :class:`PlannedAlltoAllTokenDispatcher` takes
the same numbers from a host plan (``replay.dispatch_plan``) and sets exactly the attributes
megatron's own ``preprocess`` sets, leaving megatron's permute / all-to-all / sort / combine code
to run unchanged. Whenever the plan cannot vouch for a call it runs megatron's own path, and
counts why (``plan_stats``).

megatron picks the dispatcher class inside ``MoELayer.__init__`` (from
``config.moe_token_dispatcher_type``, not from the spec), so the spec installs
:class:`ReplayMoELayer`, which re-classes the dispatcher megatron built: no megatron source or
module attribute is modified.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_pr2.patch.version import TESTED_VERSIONS, megatron_core_version
from megatron_pr2.replay.state import RouteAction

if TYPE_CHECKING:
    from megatron_pr2.replay.dispatch_plan import DispatchSlot, MicrobatchSizes

#: Attributes of megatron's dispatcher that ``preprocess`` sets and the rest of the dispatcher
#: reads (canary: tests/unit/test_patch_points.py checks them on every tested version).
PREPROCESS_ATTRIBUTES = (
    "num_out_tokens",
    "input_splits",
    "output_splits",
    "output_splits_tp",
    "num_global_tokens_per_local_expert",
    "cuda_sync_point",
)


#: Every outcome a planned dispatcher call counts in ``plan_stats``: ``planned``, then why
#: megatron's own path ran (fixed, so ranks can reduce the counts as one vector).
DISPATCH_OUTCOMES = (
    "planned",
    "router_live",  # the router routes live (no replay this pass)
    "no_plan",  # replaying, but no plan installed
    "partial_routes",  # no routes, or -1 (live fallback) rows, on some rank of the group
    "microbatch_not_planned",  # more dispatcher calls than the plan has microbatches
    "padding_mask",  # megatron masks padded tokens: counts differ from the routes
    "untested_megatron_core",
    "capacity_factor",
    "quantization_padding",
    "cuda_graph",
)


def unsupported_reason(config: Any) -> str | None:
    """Why a config's dispatch cannot be planned from routes (None: it can)."""
    if megatron_core_version() not in TESTED_VERSIONS:
        return "untested_megatron_core"
    if getattr(config, "moe_expert_capacity_factor", None) is not None:
        return "capacity_factor"  # dropping happens after routing: counts are not the routes'
    if getattr(config, "moe_router_padding_for_quantization", False):
        return "quantization_padding"
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        return "cuda_graph"
    return None


class PlannedAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher, with ``preprocess`` answered from a replay plan."""

    # Set by ReplayMoELayer right after re-classing (megatron built the instance).
    dispatch_slot: DispatchSlot | None
    plan_stats: Counter[str]
    _replay_router: Any
    _padding_mask_given: bool
    _static_reason: str | None

    def _init_plan_state(self, router: Any) -> None:
        self.dispatch_slot = None
        self.plan_stats = Counter()
        self._replay_router = router
        self._padding_mask_given = False
        self._static_reason = unsupported_reason(self.config)

    def _router_replays(self) -> bool:
        state = getattr(self._replay_router, "router_replay", None)
        return getattr(state, "action", None) is RouteAction.REPLAY

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        slot = self.dispatch_slot
        if self._static_reason is not None:
            choice: MicrobatchSizes | str = self._static_reason
        elif slot is None:
            choice = "no_plan" if self._router_replays() else "router_live"
        else:
            choice = slot.next_sizes(
                routing_map.size(0), self._router_replays(), self._padding_mask_given
            )
        if isinstance(choice, str):
            self.plan_stats[choice] += 1
            # megatron lowers its sync point from wherever it is; a planned call left it at
            # "no_sync", so start every live call there too (megatron's own initial value).
            self.cuda_sync_point = "no_sync"
            return super().preprocess(routing_map)
        self.plan_stats["planned"] += 1
        if slot is not None and slot.verify:
            slot.check_counts(routing_map, choice)
        return self._preprocess_from_plan(routing_map, choice)

    def _preprocess_from_plan(
        self, routing_map: torch.Tensor, sizes: MicrobatchSizes
    ) -> torch.Tensor:
        """The attributes megatron's dropless ``preprocess`` sets, already on the host: its
        later ``_maybe_dtoh_and_synchronize`` calls then copy nothing and never synchronise."""
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        if self.ep_size > 1 or self.tp_size > 1:
            self.input_splits = sizes.input_splits
            self.output_splits = sizes.output_splits
            self.output_splits_tp = sizes.output_splits_tp
        if self.num_local_experts > 1:  # on permute_idx_device already (DispatchSlot)
            self.num_global_tokens_per_local_expert = sizes.global_tokens_per_local_expert
        self.cuda_sync_point = "no_sync"
        return sizes.tokens_per_local_expert


class ReplayMoELayer(MoELayer):
    """``MoELayer`` whose all-to-all dispatcher can take its sizes from a replay plan."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dispatcher = self.token_dispatcher
        if type(dispatcher) is MoEAlltoAllTokenDispatcher:
            # Same instance, same state (shared experts, stream, inference-mode references);
            # only ``preprocess`` changes.
            dispatcher.__class__ = PlannedAlltoAllTokenDispatcher
            dispatcher._init_plan_state(self.router)

    @property
    def planned_dispatcher(self) -> PlannedAlltoAllTokenDispatcher | None:
        dispatcher = self.token_dispatcher
        return dispatcher if isinstance(dispatcher, PlannedAlltoAllTokenDispatcher) else None

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        # megatron masks padded tokens out of the routing map: counts then differ from routes.
        planned = self.planned_dispatcher
        if planned is not None:
            planned._padding_mask_given = padding_mask is not None
        return super().route(hidden_states, padding_mask)
