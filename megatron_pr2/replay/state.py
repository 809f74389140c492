"""Per-router replay state: what the router does in this pass, and which route each call uses.

The object plugs into megatron-core's own replay hook: ``topk_routing_with_score_function`` calls
``router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``
wherever it would take a top-k, so megatron's probability math (softmax pre/post, sigmoid,
expert bias, scaling factor, groups) stays in charge of gate weights and their gradients.

Unlike the native ``RouterReplay`` it

* tells an original forward from an activation-recompute forward (which runs inside autograd's
  backward) and makes the recompute use exactly the route of the original forward of the same
  microbatch, in every schedule (a FIFO per router: megatron's schedules run each chunk's
  backward passes in the order of its forward passes);
* takes one route per microbatch for the whole pass (a plan), so a forward cannot silently reuse
  another microbatch's route, and a surplus forward is an error;
* keeps no global registry and holds at most one pass worth of routes (``reset`` drops them).

Recompute FIFO invariant: within one pass, the k-th recompute of a router re-runs its k-th
forward. megatron's schedules (no pipelining, 1F1B, interleaved) run each model chunk's backward
passes in the order of its forward passes, and each chunk has its own routers.
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from megatron_pr2.predictor.state import PredictorState
from megatron_pr2.replay import metrics as replay_metrics
from megatron_pr2.replay.keys import MicrobatchKeys
from megatron_pr2.replay.routes import FALLBACK, validate_routes

TopkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class RouteAction(enum.Enum):
    LIVE = "live"  # plain megatron routing
    RECORD = "record"  # live routing; keep each microbatch's top-k
    REPLAY = "replay"  # force the planned expert set of each microbatch
    OBSERVE = "observe"  # live routing; measure it against the planned set (drift under `none`)


def in_backward_recompute() -> bool:
    """True while autograd's engine runs a backward, i.e. inside an activation recompute."""
    return torch._C._current_graph_task_id() != -1


class RouterReplayState:
    """Replay state of one ``TopKRouter`` (one MoE layer)."""

    def __init__(
        self,
        num_experts: int,
        topk: int,
        collect_metrics: bool = True,
        metrics_token_stride: int = 1,
    ) -> None:
        self.num_experts = num_experts
        self.topk = topk
        self.collect_metrics = collect_metrics
        self.metrics_token_stride = metrics_token_stride
        self.layer_number: int | None = None  # megatron sets it (0.19 through set_layer_number)
        self.action = RouteAction.LIVE
        self._plan: Sequence[PlannedRoute | None] = ()
        self._cursor = 0
        self.recorded: list[torch.Tensor] = []
        # Routes of this pass's forwards, and their microbatches, in forward order.
        self._recompute_queue: deque[torch.Tensor] = deque()
        self._recompute_microbatches: deque[int] = deque()
        self.counters: torch.Tensor | None = None
        self.predictor: PredictorState | None = None  # set by the router in pr2 mode
        self._token_keys: Sequence[MicrobatchKeys | None] = ()
        self._staged_indices: torch.Tensor | None = None
        self._pending_loss: torch.Tensor | None = None
        # Route tracing (diagnostics, see replay.session.RouteTrace): (keys, used, live) of every
        # metrics_token_stride-th token per router call; None = off. Survives reset().
        self.trace: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # ---------------------------------------------------------------- control (schedule side)
    def set_action(
        self,
        action: RouteAction,
        plan: list[torch.Tensor | PlannedRoute | None] | None = None,
        token_keys: list[MicrobatchKeys | torch.Tensor | None] | None = None,
        predictor_loss: bool = False,
        cache_features: bool = False,
        num_tokens: Sequence[int | None] | None = None,
    ) -> None:
        """Start a pass. For REPLAY and OBSERVE, ``plan`` holds one route (or None = live) per
        microbatch; each is validated here, before any forward runs, so a bad route never
        reaches routing. ``num_tokens``: the router's tokens per microbatch (default: the
        lengths of ``token_keys``, when given), so a wrong row count in any microbatch is also
        refused here, not after earlier microbatches ran. ``cache_features`` (pr2_r3's
        old-log-prob pass): a REPLAY pass that also fills the predictor's feature cache, as a
        pr2 RECORD pass does."""
        keys = [
            k if k is None or isinstance(k, MicrobatchKeys) else MicrobatchKeys(k)
            for k in token_keys or []
        ]
        planned: list[PlannedRoute | None] = []
        if action in (RouteAction.REPLAY, RouteAction.OBSERVE):
            if plan is None:
                raise ValueError(
                    f"layer {self.layer_number}: {action.name} needs one route per microbatch"
                )
            if num_tokens is None and keys:
                num_tokens = [None if k is None else len(k) for k in keys]
            if num_tokens is not None and len(num_tokens) != len(plan):
                raise ValueError(
                    f"layer {self.layer_number}: routes for {len(plan)} microbatch(es), but the "
                    f"pass has {len(num_tokens)}"
                )
            planned = [
                self.prepare(routes, mb, num_tokens=None if num_tokens is None else num_tokens[mb])
                for mb, routes in enumerate(plan)
            ]
        self.start_prepared_pass(action, planned, keys, predictor_loss, cache_features)

    def start_prepared_pass(
        self,
        action: RouteAction,
        plan: Sequence[PlannedRoute | None],
        token_keys: Sequence[MicrobatchKeys | None] | None,
        predictor_loss: bool = False,
        cache_features: bool = False,
    ) -> None:
        """``set_action`` for a plan already validated by :meth:`prepare` and keys already
        wrapped (the session's per-pass path: nothing is checked or copied again)."""
        self.reset()
        self._plan = plan
        self._token_keys = token_keys or ()
        if self.predictor is not None:
            self.predictor.compute_loss = predictor_loss and action is RouteAction.REPLAY
            self.predictor.cache_features = cache_features and action is RouteAction.REPLAY
        self.action = action

    def reset(self) -> None:
        """Drop every route held: plan, records, recompute queue. Counters survive."""
        self.action = RouteAction.LIVE
        # Empty tuples, not new lists: a pass resets every router twice, and an empty tuple
        # is a shared constant while each new list is an allocation.
        self._plan = ()
        self._cursor = 0
        if self.recorded:
            self.recorded = []
        self._recompute_queue.clear()
        self._recompute_microbatches.clear()
        self._token_keys = ()
        self._staged_indices = None
        self._pending_loss = None
        if self.predictor is not None:
            self.predictor.compute_loss = False
            self.predictor.cache_features = False

    def take_counters(self) -> torch.Tensor | None:
        counters, self.counters = self.counters, None
        return counters

    @property
    def routes_held(self) -> int:
        """Route tensors referenced by this state (for leak checks)."""
        return len(self._plan) + len(self.recorded) + len(self._recompute_queue)

    @property
    def planned_microbatches_left(self) -> int:
        return len(self._plan) - self._cursor

    # ---------------------------------------------------------------- megatron's hook
    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: TopkFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        action = self.action
        if action is RouteAction.LIVE:
            # A caller of megatron's API may clear the action between a replayed forward and its
            # backward: the recompute still takes that forward's route. (Under the session the
            # queue is always empty here: one check.)
            if not (self._recompute_queue and in_backward_recompute()):
                return default_compute_topk(
                    scores, topk, num_groups=num_groups, group_topk=group_topk
                )
            return self._recompute(scores)
        if in_backward_recompute():
            return self._recompute(scores)
        live_topk = functools.partial(
            default_compute_topk, topk=topk, num_groups=num_groups, group_topk=group_topk
        )
        if action is RouteAction.REPLAY:  # the update passes: the hot path, checked first
            microbatch = self._cursor
            indices = self._replay_indices(scores, live_topk)
            self._remember_for_recompute(indices, microbatch)
            if self.trace is not None:
                self._trace(microbatch, indices, scores, live_topk)
            return scores.gather(1, indices), indices

        if action is RouteAction.RECORD:
            microbatch = self._cursor  # == len(self.recorded) in a session pass; megatron's
            self._cursor += 1  # API may drop records (clear_indices) mid-pass and keep counting
            live: torch.Tensor | None = None
            if self._staged_indices is not None:  # pr2: the predicted set, unbiased gate weights
                indices, self._staged_indices = self._staged_indices, None
                values = scores.gather(1, indices)
            else:
                values, indices = live_topk(scores)
                live = indices
            self.recorded.append(indices)
        else:  # OBSERVE
            microbatch = self._cursor
            values, indices = live_topk(scores)
            self._observe(indices, microbatch)
            live = indices
        self._remember_for_recompute(indices, microbatch)
        if self.trace is not None:
            self._trace(microbatch, indices, scores, live_topk, live)
        return values, indices

    def _trace(
        self,
        microbatch: int,
        used: torch.Tensor,
        scores: torch.Tensor,
        live_topk: Callable,
        live: torch.Tensor | None = None,
    ) -> None:
        """Keep (token keys, experts used, live top-k) of every stride-th token (host sync: a
        diagnostic, off unless a trace is requested)."""
        assert self.trace is not None
        rows = slice(None, None, self.metrics_token_stride)
        with torch.no_grad():
            keys = self.microbatch_keys(microbatch, scores.shape[0], scores.device).host[rows]
            live_rows = live[rows] if live is not None else live_topk(scores.detach()[rows])[1]
            self.trace.append(
                (
                    keys,
                    used.detach()[rows].to(torch.int16).cpu(),
                    live_rows.to(torch.int16).cpu(),
                )
            )

    # ---------------------------------------------------------------- pr2 hooks (router side)
    def microbatch_of_current_call(self) -> int:
        """Microbatch index of the router call now running (before its top-k is taken)."""
        if in_backward_recompute() and self._recompute_microbatches:
            return self._recompute_microbatches[0]
        return self._cursor  # RECORD, REPLAY and OBSERVE all count forwards with the cursor

    def microbatch_keys(
        self, microbatch: int, num_tokens: int, device: torch.device
    ) -> MicrobatchKeys:
        """Token keys of a microbatch: given (sample, position) keys, else (microbatch, row)."""
        if microbatch < len(self._token_keys) and self._token_keys[microbatch] is not None:
            keys = self._token_keys[microbatch]
            if len(keys) != num_tokens:
                raise ValueError(
                    f"token keys for layer {self.layer_number}, microbatch {microbatch}: expected "
                    f"{num_tokens}, got {len(keys)}"
                )
            return keys
        return MicrobatchKeys.positional(microbatch, num_tokens, device)

    def stage_indices(self, indices: torch.Tensor) -> None:
        """The next RECORD top-k uses these (predicted) indices instead of the live ones."""
        self._staged_indices = indices

    def set_pending_loss(self, loss: torch.Tensor | None) -> None:
        self._pending_loss = loss

    def take_pending_loss(self) -> torch.Tensor | None:
        loss, self._pending_loss = self._pending_loss, None
        return loss

    # ---------------------------------------------------------------- internals
    def _remember_for_recompute(self, indices: torch.Tensor, microbatch: int) -> None:
        # Always queued: megatron runs a checkpointed region's first forward under no_grad, so
        # grad mode cannot tell it from a forward-only pass. The queue holds references to routes
        # of the current pass only and is dropped by ``reset`` at the end of the pass. (Integer
        # index tensors never carry autograd history, so no ``detach`` is needed here or above.)
        self._recompute_queue.append(indices)
        self._recompute_microbatches.append(microbatch)

    def _recompute(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._recompute_queue:
            raise RuntimeError(
                f"layer {self.layer_number}: activation recompute without a matching forward "
                f"route (action {self.action.value}); the replay state was reset mid-pass"
            )
        indices = self._recompute_queue.popleft()
        self._recompute_microbatches.popleft()
        if indices.shape[0] != scores.shape[0]:
            raise RuntimeError(
                f"layer {self.layer_number}: recompute sees {scores.shape[0]} tokens but its "
                f"forward routed {indices.shape[0]}; recompute order does not match forward order"
            )
        return scores.gather(1, indices), indices

    def _replay_indices(self, scores: torch.Tensor, live_topk: Callable) -> torch.Tensor:
        microbatch = self._cursor
        planned = self._next_plan()
        num_tokens = scores.shape[0]
        if planned is None:  # whole microbatch falls back to the live router
            live = live_topk(scores.detach())[1]
            if self.collect_metrics:
                self._count(
                    live, live, torch.ones(num_tokens, dtype=torch.bool, device=live.device)
                )
            return live
        if planned.num_rows != num_tokens:  # a row count kept from prepare(): no tensor query
            raise ValueError(
                f"routes for layer {self.layer_number}, microbatch {microbatch}: the router sees "
                f"{num_tokens} tokens, the routes have {planned.num_rows} rows"
            )
        indices = planned.indices  # on the router's device since prepare()
        fallback_rows = planned.fallback_rows
        padding_rows = self._padding_rows(microbatch)
        if fallback_rows is not None:  # the live top-k fills the fallback rows
            live = live_topk(scores.detach())[1]
            indices = torch.where(fallback_rows[:, None], live, indices)
            if self.collect_metrics:
                self._count(indices, live, fallback_rows, padding_rows)
        elif self.collect_metrics:
            stride = self.metrics_token_stride
            sample = slice(None, None, stride) if stride > 1 else slice(None)
            self._count(
                indices[sample],
                live_topk(scores.detach()[sample])[1],
                None,
                None if padding_rows is None else padding_rows[sample],
            )
        return indices

    def _next_plan(self) -> PlannedRoute | None:
        microbatch = self._cursor
        if microbatch >= len(self._plan):
            raise RuntimeError(
                f"layer {self.layer_number}: forward #{microbatch + 1} but routes were given for "
                f"{len(self._plan)} microbatch(es)"
            )
        self._cursor += 1
        return self._plan[microbatch]

    def _observe(self, live: torch.Tensor, microbatch: int) -> None:
        """Count the planned (old-pass) set against the live top-k the router just used."""
        planned = self._next_plan()
        if planned is None or not self.collect_metrics:
            return
        if planned.num_rows != live.shape[0]:
            raise ValueError(
                f"routes for layer {self.layer_number}, microbatch {microbatch}: the router sees "
                f"{live.shape[0]} tokens, the routes have {planned.num_rows} rows"
            )
        stride = self.metrics_token_stride
        sample = slice(None, None, stride) if stride > 1 else slice(None)
        padding_rows = self._padding_rows(microbatch)
        fallback = planned.fallback_rows
        self._count(
            planned.indices[sample],
            live[sample],
            None if fallback is None else fallback[sample],
            None if padding_rows is None else padding_rows[sample],
        )

    def _padding_rows(self, microbatch: int) -> torch.Tensor | None:
        """Rows with negative token keys (padding, see ``routes.layout``), when keys are given
        and the microbatch has padding (computed once per microbatch for all routers)."""
        if microbatch < len(self._token_keys) and self._token_keys[microbatch] is not None:
            return self._token_keys[microbatch].padding_rows()
        return None

    def _count(
        self,
        used: torch.Tensor,
        live: torch.Tensor,
        fallback_rows: torch.Tensor | None,
        padding_rows: torch.Tensor | None = None,
    ) -> None:
        if self.counters is None:
            self.counters = replay_metrics.new_counters(self.topk, used.device)
        replay_metrics.accumulate(self.counters, used, live, fallback_rows, padding_rows)

    def prepare(
        self,
        routes: torch.Tensor | PlannedRoute | None,
        microbatch: int,
        device: torch.device | str | None = None,
        num_tokens: int | None = None,
    ) -> PlannedRoute | None:
        """Validate one microbatch's routes once and move them to ``device`` once; a
        ``PlannedRoute`` passes through (its row count still checked against ``num_tokens``,
        the tokens this router sees in that microbatch, when known)."""
        layer = self.layer_number if self.layer_number is not None else -1
        if routes is None:
            return routes
        if isinstance(routes, PlannedRoute):
            if num_tokens is not None and routes.num_rows != num_tokens:
                raise ValueError(
                    f"routes for layer {layer}, microbatch {microbatch}: expected {num_tokens} "
                    f"tokens (rows), got {routes.num_rows}"
                )
            return routes
        indices = validate_routes(
            routes,
            layer=layer,
            num_experts=self.num_experts,
            topk=self.topk,
            num_tokens=num_tokens,
            microbatch=microbatch,
        )
        fallback_rows = indices[:, 0] == FALLBACK  # validated: a -1 row is all -1
        has_fallback = bool(fallback_rows.any())
        if device is not None:
            indices = indices.to(device, non_blocking=True)
            fallback_rows = fallback_rows.to(device, non_blocking=True)
        return PlannedRoute(indices, fallback_rows if has_fallback else None, len(indices))


class PlannedRoute(NamedTuple):
    """One microbatch's validated route (validation runs once per rollout batch, not per pass)."""

    indices: torch.Tensor  # [tokens, topk] int64 global expert ids, -1 rows = live fallback
    fallback_rows: torch.Tensor | None  # [tokens] bool, None when no row falls back
    num_rows: int  # tokens, kept as an int so the per-call check queries no tensor
