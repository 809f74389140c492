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
from megatron.core.transformer.moe import token_dispatcher as megatron_dispatch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

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


class _PlannedDispatch:
    """State and decision shared by the planned dispatchers (mixed into megatron's classes)."""

    # Set by ReplayMoELayer right after re-classing (megatron built the instance).
    config: Any
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

    def _choose(self, routing_map: torch.Tensor) -> MicrobatchSizes | None:
        """This call's planned sizes, or None (megatron's own path; the reason is counted).
        Called once per forward (and recompute) of the layer, with the local routing map."""
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
            return None
        self.plan_stats["planned"] += 1
        if slot is not None and slot.verify:
            slot.check_counts(routing_map, choice)
        return choice


class PlannedAlltoAllTokenDispatcher(_PlannedDispatch, MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher, with ``preprocess`` answered from a replay plan."""

    _config_drop_and_pad: bool  # megatron's own mode (a padded planned call switches it)

    def _init_plan_state(self, router: Any) -> None:
        super()._init_plan_state(router)
        self._config_drop_and_pad = self.drop_and_pad

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        sizes = self._choose(routing_map)
        # megatron reads ``drop_and_pad`` / ``capacity`` in every later step of this call
        # (permute, all-to-all, sort, combine): set per call, megatron's own value unless padded.
        self.drop_and_pad = self._config_drop_and_pad
        if sizes is None:
            # megatron lowers its sync point from wherever it is; a planned call left it at
            # "no_sync", so start every live call there too (megatron's own initial value).
            self.cuda_sync_point = "no_sync"
            return super().preprocess(routing_map)
        if sizes.capacity is not None:
            return self._preprocess_padded(sizes.capacity)
        return self._preprocess_from_plan(routing_map, sizes)

    def _preprocess_padded(self, capacity: int) -> torch.Tensor:
        """What megatron's drop-and-pad ``preprocess`` sets, with a capacity that holds every
        count of the plan: fixed shapes, equal all-to-all splits, nothing dropped."""
        self.drop_and_pad = True
        self.capacity = capacity
        self.num_out_tokens = capacity * self.num_experts
        self.input_splits = self.output_splits = self.output_splits_tp = None  # equal splits
        self.num_global_tokens_per_local_expert = torch.full(
            (self.num_experts * self.tp_size,),
            capacity,
            dtype=torch.long,
            device=self.permute_idx_device,
        )
        self.cuda_sync_point = "no_sync"
        return torch.full(
            (self.num_local_experts,), capacity * self.tp_size * self.ep_size, dtype=torch.long
        )

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


#: Statements of megatron's ``MoEAllGatherTokenDispatcher.dispatch_postprocess`` that
#: :meth:`PlannedAllGatherTokenDispatcher.dispatch_postprocess` mirrors (canary:
#: tests/unit/test_patch_points.py checks them, and the two methods' results, per version).
ALLGATHER_POSTPROCESS_STATEMENTS = (
    "self.hidden_shape_before_permute = hidden_states.shape",
    "self.local_map = self.routing_map[",
    "self.local_probs = probs[",
    "tokens_per_expert = self.local_map.sum(dim=0).long().cpu()",
    "self.local_probs = self.local_probs.T.contiguous().masked_select(",
    "self.routing_map = None",
    "return permuted_local_hidden_states, tokens_per_expert, self.local_probs",
)


class PlannedAllGatherTokenDispatcher(_PlannedDispatch, MoEAllGatherTokenDispatcher):
    """megatron's all-gather dispatcher, with the tokens per local expert from a replay plan.

    megatron reads them with a blocking ``.cpu()`` inside ``dispatch_postprocess`` (the only
    host read of the dispatcher); the statement sits mid-method, between the local-map slice
    and ``permute``, with no hook around it, so the planned call re-states the method's few
    tensor operations around megatron's own ``permute`` (the statements are pinned by a
    canary, and the result compared with megatron's method on every tested version).
    """

    _planned_sizes: MicrobatchSizes | None = None

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._planned_sizes = self._choose(routing_map)  # the local map: this rank's routes
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def dispatch_postprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes, self._planned_sizes = self._planned_sizes, None
        if sizes is None:
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        self.local_map = self.routing_map[:, first:last].contiguous()
        self.local_probs = probs[:, first:last].contiguous()
        tokens_per_expert = sizes.tokens_per_local_expert  # on the host already: no read
        # 0.16 returns (tokens, probs, mapping), 0.19 two more: the mapping is third in both.
        permuted = megatron_dispatch.permute(  # the function megatron's method calls
            hidden_states,
            self.local_map,
            num_out_tokens=sizes.received_tokens,
            fused=self.config.moe_permute_fusion,
        )
        self.reversed_local_input_permutation_mapping = permuted[2]
        self.local_probs = self.local_probs.T.contiguous().masked_select(
            self.local_map.T.contiguous()
        )
        self.routing_map = None
        return permuted[0], tokens_per_expert, self.local_probs


PlannedDispatcher = PlannedAlltoAllTokenDispatcher | PlannedAllGatherTokenDispatcher
_PLANNED_CLASSES: dict[type, type] = {
    MoEAlltoAllTokenDispatcher: PlannedAlltoAllTokenDispatcher,
    MoEAllGatherTokenDispatcher: PlannedAllGatherTokenDispatcher,
}


class ReplayMoELayer(MoELayer):
    """``MoELayer`` whose all-to-all or all-gather dispatcher can take its sizes from a replay
    plan (other dispatchers, e.g. flex, stay megatron's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dispatcher = self.token_dispatcher
        planned_cls = _PLANNED_CLASSES.get(type(dispatcher))
        if planned_cls is not None:
            # Same instance, same state (shared experts, stream, inference-mode references);
            # only the size computation changes.
            dispatcher.__class__ = planned_cls
            dispatcher._init_plan_state(self.router)

    @property
    def planned_dispatcher(self) -> PlannedDispatcher | None:
        dispatcher = self.token_dispatcher
        return dispatcher if isinstance(dispatcher, _PlannedDispatch) else None  # type: ignore[return-value]

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        # megatron masks padded tokens out of the routing map: counts then differ from routes.
        planned = self.planned_dispatcher
        if planned is not None:
            planned._padding_mask_given = padding_mask is not None
        return super().route(hidden_states, padding_mask)
