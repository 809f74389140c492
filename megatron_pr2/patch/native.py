"""Patch point 1b: megatron-core's own ``RouterReplay`` API, served by our replay state.

Code written against megatron's native replay (``RouterReplay.set_replay_data``,
``set_global_router_replay_action``, ``get_recorded_data``, ...) runs unchanged on
``ReplayTopKRouter``: its ``router.router_replay`` is a :class:`CompatRouterReplay`, which is both
a megatron ``RouterReplay`` (registered in ``RouterReplay.global_router_replay_instances``) and a
:class:`~megatron_pr2.replay.state.RouterReplayState` (what ``ReplaySession`` drives). One object,
two drivers; megatron's documented behaviour, with these fixes:

* **Recompute.** An activation recompute (it runs inside autograd's backward) takes the route of
  the original forward of the same microbatch from a FIFO, whatever the action is then. Native
  ``REPLAY_FORWARD`` uses the last target set (wrong under pipeline schedules); native
  ``REPLAY_BACKWARD`` is right only if the caller switches to it before every backward, for
  which megatron has no hook. Switching to ``REPLAY_BACKWARD`` here changes nothing: the same
  FIFO serves it, so the result is the same.
* **Routes are checked** when set (``set_target_indices`` / ``set_replay_data``): dtype, shape,
  expert range, duplicates, naming the layer and token (``replay.routes``); all ``-1`` rows fall
  back to the live router; a row count that differs from the router's tokens is refused.
* **Metrics**: the replay counters are kept as under the session; read them with
  ``ReplaySession(model_chunks).metrics()``.
* **PR2**: with ``mode="pr2"``, ``RECORD`` records the predicted top-k (top-k of logits plus the
  predictor's offset) and ``get_recorded_data()`` returns it. A framework that runs the update
  mini-steps itself makes two calls per mini-step: :meth:`CompatRouterReplay.start_pr2_mini_step`
  before it, and ``predictor_frozen_unless(optimizer, active=mini_step >= 1)`` around its
  ``optimizer.step()`` (see ``megatron_pr2.predictor.optim``).
* **Token keys** (not in megatron): routes can follow the token when a pass micro-batches,
  orders or packs samples differently from the pass that recorded them. Give the routes with
  their keys (``sample << 32 | position``, see ``routes.layout.rank_token_keys``) once,
  ``CompatRouterReplay.set_replay_data(per_layer_routes, token_keys=keys)`` (or per router
  ``set_target_indices(routes, token_keys=keys)``), then before each forward
  ``CompatRouterReplay.set_global_token_keys(keys_of_this_microbatch)``: each router's target
  is its rows for those tokens (negative keys, padding, route live; a key never given is
  refused). The keys of a forward also pair a PR2 mini-step's tokens with the features its
  ``RECORD`` pass cached under the same keys (set them in the ``RECORD`` pass too), so the
  mini-steps may micro-batch differently. Keys given before an action change still belong to
  the next forward.
* **No leak**: megatron's instance list is class-level and only grows; ours are registered as
  weak proxies that leave the list when their router is collected. Under
  ``torch.inference_mode`` (0.19's inference engine sets ``RECORD`` before every step and never
  clears) each action call drops what no backward can need, so routes held stay bounded.
* **Static buffers** (0.19, CUDA-graph inference): records are copied into the buffer inside
  the forward, as megatron's ``record_indices`` does.

Action changes never drop routes a pending backward still needs (a caller may switch or clear
actions per microbatch). A ``RECORD`` pass after a ``REPLAY`` pass or the reverse (with or
without a cleared action between them) starts a new pass: the FIFO of the previous one (e.g. a
forward-only pass, never recomputed) is dropped, and a new ``RECORD`` pass starts a new PR2
feature cache. As megatron asks, call ``RouterReplay.clear_global_indices()`` after every step,
and also between a forward-only pass and a training pass that replay the same way: routes of
forwards that are never recomputed stay queued until then.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_pr2.replay.keys import MicrobatchKeys
from megatron_pr2.replay.state import PlannedRoute, RouteAction, RouterReplayState
from megatron_pr2.replay.token_routes import TokenRoutes

#: The native action a session-driven action reads as.
_NATIVE_VIEW: dict[RouteAction, RouterReplayAction | None] = {
    RouteAction.LIVE: None,
    RouteAction.RECORD: RouterReplayAction.RECORD,
    RouteAction.REPLAY: RouterReplayAction.REPLAY_FORWARD,
    RouteAction.OBSERVE: None,
}


class _TargetPlan:
    """The plan a natively driven ``REPLAY`` pass reads in place of a session's list: every
    forward takes the target set last (megatron's ``REPLAY_FORWARD`` contract), and there is no
    surplus-forward limit, so the state's replay path runs unchanged."""

    __slots__ = ("layer_number", "route")

    def __init__(self) -> None:
        self.route: PlannedRoute | None = None
        self.layer_number: int | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, microbatch: int) -> PlannedRoute:
        if self.route is None:
            raise RuntimeError(
                f"layer {self.layer_number}: REPLAY_FORWARD without a target; call "
                "RouterReplay.set_replay_data([...]) or set_target_indices(...) before the forward"
            )
        return self.route


class CompatRouterReplay(RouterReplayState, RouterReplay):
    """A megatron ``RouterReplay`` whose state is a ``RouterReplayState`` (see the module doc)."""

    def __init__(
        self,
        num_experts: int,
        topk: int,
        collect_metrics: bool = True,
        metrics_token_stride: int = 1,
        device_of: torch.Tensor | None = None,
    ) -> None:
        """``device_of``: a tensor (the router weight) whose device targets are moved to once,
        when set, instead of on every forward as megatron does."""
        self._targets = _TargetPlan()
        self._native: tuple[RouteAction, RouterReplayAction | None] = (RouteAction.LIVE, None)
        self._pass_kind: RouteAction | None = None  # RECORD or REPLAY: the native pass running
        self._device_of = device_of
        self._keyed: TokenRoutes | None = None  # routes given with token keys
        RouterReplayState.__init__(self, num_experts, topk, collect_metrics, metrics_token_stride)
        # megatron's own constructor sets its per-version fields (0.19: static_buffer,
        # layer_number) through the properties below, and appends a strong reference.
        RouterReplay.__init__(self)
        self.layer_number = None
        _register_weakly(self)

    # ------------------------------------------------------------------ native fields
    @property
    def target_topk_idx(self) -> torch.Tensor | None:
        route = self._targets.route
        return None if route is None else route.indices

    @target_topk_idx.setter
    def target_topk_idx(self, indices: torch.Tensor | None) -> None:
        self._set_target(indices)

    @property
    def recorded_topk_idx(self) -> torch.Tensor | None:
        return self.recorded[-1] if self.recorded else None

    @recorded_topk_idx.setter
    def recorded_topk_idx(self, indices: torch.Tensor | None) -> None:
        if indices is None:
            self.recorded = self._no_records()
        else:
            self.recorded.append(indices)

    @property
    def router_replay_action(self) -> RouterReplayAction | None:
        internal, native = self._native
        return native if internal is self.action else _NATIVE_VIEW[self.action]

    @router_replay_action.setter
    def router_replay_action(self, action: RouterReplayAction | None) -> None:
        self.set_router_replay_action(action)

    @property
    def replay_backward_list(self) -> list[torch.Tensor]:
        """Routes pending a recompute, oldest first (a copy; megatron's list of every target
        set, which grows without recompute, is replaced by the FIFO of forwards run)."""
        return list(self._recompute_queue)

    @replay_backward_list.setter
    def replay_backward_list(self, routes: list[torch.Tensor]) -> None:
        if routes:
            raise ValueError("the recompute queue is filled by forwards, not assigned")
        self._recompute_queue.clear()
        self._recompute_microbatches.clear()

    @property
    def layer_number(self) -> int | None:
        return self._targets.layer_number

    @layer_number.setter
    def layer_number(self, layer_number: int | None) -> None:
        self._targets.layer_number = layer_number

    @property
    def routes_held(self) -> int:
        if self._plan is not self._targets:
            return super().routes_held
        target = 0 if self._targets.route is None else 1
        keyed = 0 if self._keyed is None else 1
        return target + keyed + len(self.recorded) + len(self._recompute_queue)

    # ------------------------------------------------------------------ native methods
    def set_target_indices(
        self, topk_indices: torch.Tensor, token_keys: torch.Tensor | None = None
    ) -> None:
        """The route of the next forward(s), validated now (megatron also queues it for
        ``REPLAY_BACKWARD``; here the forward that uses it queues it for its recompute).

        ``token_keys`` (ours): ``[rows]`` int64 keys of ``topk_indices``'s rows, in any number
        and order (e.g. a whole batch recorded with another micro-batching); the routes are
        then held by token, and each forward's target is picked by :meth:`set_token_keys`.
        """
        if token_keys is None:
            self._keyed = None
            self._set_target(topk_indices)
            return
        keys = torch.as_tensor(token_keys).reshape(-1)
        if keys.dtype != torch.int64 or keys.shape[0] != topk_indices.shape[0]:
            raise ValueError(
                f"layer {self.layer_number}: token_keys must be int64, one per route row "
                f"({topk_indices.shape[0]}); got {keys.dtype} {tuple(keys.shape)}"
            )
        checked = self.prepare(topk_indices, self._cursor)  # every row checked once, here
        layer = self.layer_number or 0
        self._keyed = TokenRoutes.from_microbatches({layer: [checked.indices]}, [keys])
        self._targets.route = None

    def set_token_keys(self, token_keys: torch.Tensor) -> None:
        """Token keys of the next forward's rows (router row order, negative = padding), as
        ``set_target_indices`` is called before it: with routes held by token, the forward's
        target becomes their rows for these tokens (padding rows route live); in pr2 the
        keys pair tokens with their cached features. See the module doc."""
        keys = MicrobatchKeys(
            torch.as_tensor(token_keys).reshape(-1),
            None if self._device_of is None else self._device_of.device,
        )
        self._store_keys(self._cursor, keys)
        if self._keyed is not None:
            (rows,) = self._keyed.plan([keys.host], padding_live=True)[self._keyed.layers[0]]
            self._set_target(rows)

    @staticmethod
    def set_replay_data(
        all_layers_topk_indices: list[torch.Tensor], token_keys: torch.Tensor | None = None
    ) -> None:
        """megatron's ``RouterReplay.set_replay_data``; with ``token_keys`` (``[rows]``, the keys
        of every layer's rows) the routes are held by token (see :meth:`set_target_indices`)."""
        if token_keys is None:
            RouterReplay.set_replay_data(all_layers_topk_indices)
            return
        instances = RouterReplay.global_router_replay_instances
        if len(all_layers_topk_indices) != len(instances):
            raise ValueError(
                f"The number of replay tensors ({len(all_layers_topk_indices)}) does not match "
                f"instances ({len(instances)})."
            )
        for router, indices in zip(instances, all_layers_topk_indices):
            router.set_target_indices(indices, token_keys=token_keys)

    @staticmethod
    def set_global_token_keys(token_keys: torch.Tensor) -> None:
        """:meth:`set_token_keys` on every registered router of ours (before each forward)."""
        for router in RouterReplay.global_router_replay_instances:
            if isinstance(router, CompatRouterReplay):
                router.set_token_keys(token_keys)

    def get_recorded_indices(self) -> torch.Tensor | None:
        """The top-k of the last recorded forward (pr2: the predicted top-k; a view of the
        static buffer while one is set)."""
        return self.recorded[-1] if self.recorded else None

    def record_indices(self, topk_indices: torch.Tensor) -> None:
        self.recorded.append(topk_indices)

    def set_static_buffer(self, buffer: torch.Tensor) -> None:
        """megatron >= 0.19 (CUDA-graph inference): every record is copied into ``buffer`` when
        it is taken, inside the forward, as megatron's ``record_indices`` does."""
        self.static_buffer = buffer
        self.recorded = _BufferedRecords(self.recorded, buffer)

    def clear_static_buffer(self) -> None:
        self.static_buffer = None
        self.recorded = list(self.recorded)

    def clear_indices(self) -> None:
        """Drop targets, records and the recompute FIFO; keep the action (as megatron does) and
        the PR2 mini-step setting."""
        self._targets.route = None
        self._keyed = None
        self._token_keys = ()
        self.recorded = self._no_records()
        self._pass_kind = None  # the next RECORD or REPLAY starts a new pass
        self._recompute_queue.clear()
        self._recompute_microbatches.clear()
        self._staged_indices = None
        self._pending_loss = None

    def set_router_replay_action(self, router_replay_action: RouterReplayAction | None) -> None:
        """Map megatron's action onto ours (see the module doc). Under ``torch.inference_mode``
        (0.19's inference engine sets RECORD before every decode step) no backward can follow,
        so the recompute FIFO is dropped and only the last record kept: bounded memory over a
        rollout, as megatron's overwrite gives."""
        if torch.is_inference_mode_enabled():
            self._recompute_queue.clear()
            self._recompute_microbatches.clear()
            if len(self.recorded) > 1:
                del self.recorded[:-1]
        action = router_replay_action
        if action is None:
            internal = RouteAction.LIVE
        elif action is RouterReplayAction.RECORD:
            internal = RouteAction.RECORD
        elif action is RouterReplayAction.REPLAY_FORWARD:
            internal = RouteAction.REPLAY
        elif action is RouterReplayAction.REPLAY_BACKWARD:
            # A recompute reads the FIFO under any action; outside a backward, keep doing what
            # the pass does (megatron documents REPLAY_BACKWARD for the recompute only).
            current = self.action
            recording_or_replaying = current in (RouteAction.RECORD, RouteAction.REPLAY)
            internal = current if recording_or_replaying else RouteAction.REPLAY
        else:
            raise ValueError(f"layer {self.layer_number}: unknown router replay action {action!r}")
        if internal is not self.action or (
            internal is RouteAction.REPLAY and self._plan is not self._targets
        ):
            self._enter(internal)
        self._native = (internal, action)

    def clear_router_replay_action(self) -> None:
        self.set_router_replay_action(None)

    # ------------------------------------------------------------------ PR2 mini-steps
    def start_mini_step(self, mini_step: int, first_microbatch: int) -> None:
        """This router's part of :meth:`start_pr2_mini_step`."""
        if mini_step < 0 or first_microbatch < 0:
            raise ValueError(
                f"mini_step ({mini_step}) and first_microbatch ({first_microbatch}) must be >= 0"
            )
        self._cursor = first_microbatch
        if self.predictor is not None:
            self.predictor.compute_loss = mini_step >= 1

    @staticmethod
    def start_pr2_mini_step(mini_step: int, first_microbatch: int) -> None:
        """Call before each update mini-step a framework runs with the native API (pr2 mode).

        Mini-step 0 runs near on-policy, so the predictor loss is off; from mini-step 1 each
        router adds its predictor loss (on the tokens cached by the ``RECORD`` pass) through
        megatron's aux-loss plumbing. ``first_microbatch``: the index, in the ``RECORD`` pass's
        order, of this mini-step's first microbatch; the mini-step's microbatches must be the
        recorded ones from there on, in order, with the same micro-batch size (tokens are paired
        with their cached features by (microbatch, row)). Pair it with
        ``predictor_frozen_unless(optimizer, active=mini_step >= 1)`` around the step.
        """
        for router in RouterReplay.global_router_replay_instances:
            if isinstance(router, CompatRouterReplay):
                router.start_mini_step(mini_step, first_microbatch)

    # ------------------------------------------------------------------ internals
    def _enter(self, internal: RouteAction) -> None:
        """Switch to ``internal``. Routes queued for a recompute are dropped only when a
        ``RECORD`` pass follows a ``REPLAY`` pass or the reverse (directly or through no
        action), or after ``clear_indices``: a caller that clears the action after each forward
        (under 1F1B, before earlier microbatches' backwards) keeps them."""
        if internal is not RouteAction.LIVE and internal is not self._pass_kind:
            self._recompute_queue.clear()
            self._recompute_microbatches.clear()
            self._staged_indices = None
            self._pending_loss = None
            upcoming = self._keys_at(self._cursor)  # given for the next forward: kept
            self._token_keys = ()
            if internal is RouteAction.RECORD:  # a new record pass: a new batch
                self._cursor = 0
                if self.predictor is not None:
                    self.predictor.start_recording()
                    self.predictor.compute_loss = False
            if upcoming is not None:
                self._store_keys(self._cursor, upcoming)
            self._pass_kind = internal
        if internal is not RouteAction.LIVE:
            self._plan = self._targets if internal is RouteAction.REPLAY else ()
            if self.predictor is not None:
                self.predictor.cache_features = False
        self.action = internal

    def _keys_at(self, microbatch: int) -> MicrobatchKeys | None:
        return self._token_keys[microbatch] if microbatch < len(self._token_keys) else None

    def _store_keys(self, microbatch: int, keys: MicrobatchKeys) -> None:
        """Keys of the forward counted as ``microbatch`` (what ``microbatch_keys`` reads:
        metrics padding, pr2 feature pairing), held until the pass ends or is cleared."""
        held = list(self._token_keys)
        held.extend([None] * (microbatch + 1 - len(held)))
        held[microbatch] = keys
        self._token_keys = held

    def _no_records(self) -> list[torch.Tensor]:
        buffer = getattr(self, "static_buffer", None)
        return [] if buffer is None else _BufferedRecords([], buffer)

    def _set_target(self, indices: torch.Tensor | None) -> None:
        if indices is None:
            self._targets.route = None
            return
        device = None if self._device_of is None else self._device_of.device
        self._targets.route = self.prepare(indices, self._cursor, device)


class _BufferedRecords(list):
    """The records of a router with a megatron static buffer: each is copied into the buffer as
    it is taken (inside the forward, so a captured CUDA graph copies too) and kept as the
    buffer's view, as megatron's ``record_indices`` keeps it."""

    def __init__(self, records: list[torch.Tensor], buffer: torch.Tensor) -> None:
        super().__init__(records)
        self.buffer = buffer

    def append(self, indices: torch.Tensor) -> None:
        rows = indices.shape[0]
        self.buffer[:rows].copy_(indices)
        super().append(self.buffer[:rows])


def _register_weakly(router: CompatRouterReplay) -> None:
    """Swap megatron's strong reference to ``router`` for a weak proxy (keeping construction
    order) that removes itself from the list when the router is collected: megatron's
    class-level list would otherwise keep every model ever built alive."""
    instances = RouterReplay.global_router_replay_instances
    proxy = weakref.proxy(router, _forget)
    instances[:] = [proxy if r is router else r for r in instances]


def _forget(proxy: Any) -> None:
    """Weak-proxy callback: the router is gone, so is its entry (an identity test only)."""
    instances = RouterReplay.global_router_replay_instances
    instances[:] = [r for r in instances if r is not proxy]
