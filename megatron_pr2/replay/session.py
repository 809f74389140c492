"""The schedule side of replay: which routers exist on this rank, and what each pass makes them do.

A :class:`ReplaySession` walks the live model chunks (never a global registry, so routers of
temporary models cannot be targeted), keys every replay router by its global ``layer_number``
and sets its action for one pass (one ``forward_backward_func`` call)::

    session = ReplaySession(model_chunks)
    with session.recording() as record:          # r2: old-log-prob pass, forward only
        forward_backward_func(..., forward_only=True)
    with session.replaying(record.routes):       # every update pass of that batch
        forward_backward_func(...)
    metrics = session.metrics()

Routes are ``{layer_number: [routes of microbatch 0, 1, ...]}`` with ``[tokens, topk]`` tensors
in the router's local token order (``None`` = live for that whole microbatch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from megatron_pr2.predictor import state as predictor_state
from megatron_pr2.replay import metrics as replay_metrics
from megatron_pr2.replay.keys import MicrobatchKeys
from megatron_pr2.replay.state import PlannedRoute, RouteAction, RouterReplayState
from megatron_pr2.replay.token_routes import TokenRoutes

Routes = Mapping[int, Sequence["torch.Tensor | None"]]


class PreparedRoutes(Mapping[int, list[torch.Tensor]]):
    """Validated routes, reusable for every update pass of a rollout batch without validating
    again. Reads like the plain ``{layer: [tensor per microbatch]}`` mapping."""

    def __init__(self, plans: dict[int, list[PlannedRoute | None]]) -> None:
        self.plans = plans
        # The layer tuple of the session that last checked these plans complete (every local
        # layer, one microbatch count): update passes reuse the check instead of redoing it.
        self.checked_for: tuple[int, ...] | None = None
        self._rows: list[int | None] | None = None

    def microbatch_rows(self) -> list[int | None]:
        """Route rows of each microbatch (None: live in every layer), the same in every layer:
        every router of a rank sees the same tokens. Checked once, then cached, so a pass
        start compares one count per microbatch with the tokens it expects."""
        if self._rows is None:
            rows: list[int | None] = []
            first: dict[int, int] = {}  # microbatch -> first layer with routes
            for layer, plans in self.plans.items():
                for mb, plan in enumerate(plans):
                    if plan is None:
                        continue
                    if mb >= len(rows):
                        rows.extend([None] * (mb + 1 - len(rows)))
                    if rows[mb] is None:
                        rows[mb], first[mb] = plan.num_rows, layer
                    elif plan.num_rows != rows[mb]:
                        raise ValueError(
                            f"routes for layer {layer}, microbatch {mb}: {plan.num_rows} rows, "
                            f"but layer {first[mb]} has {rows[mb]} for the same tokens"
                        )
            self._rows = rows
        return self._rows

    def __getitem__(self, layer: int) -> list[torch.Tensor]:
        return [None if p is None else p.indices for p in self.plans[layer]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


@dataclass
class RouteRecord:
    """Routes recorded in one pass; filled when the ``recording()`` block exits."""

    routes: PreparedRoutes = field(default_factory=lambda: PreparedRoutes({}))
    token_keys: list[torch.Tensor] | None = None  # host keys per microbatch, when given

    @property
    def num_microbatches(self) -> int:
        return len(next(iter(self.routes.plans.values()), []))

    def by_token(self) -> TokenRoutes:
        """The routes keyed by token, for update passes that micro-batch, order or pack the
        samples differently (see ``replay.token_routes``); needs a recording given keys."""
        if self.token_keys is None:
            raise ValueError(
                "routes recorded without token keys cannot follow the token; pass "
                "recording(token_keys) (sample << 32 | position per router row)"
            )
        return TokenRoutes.from_microbatches(self.routes, self.token_keys)


@dataclass
class RouteTrace:
    """Per-layer routes of sampled tokens in one pass: ``keys`` ``[T]`` int64 token keys,
    ``used`` ``[T, k]`` the experts the router used (recorded, predicted or replayed), ``live``
    ``[T, k]`` the live router's top-k on the same tokens (int16 expert ids)."""

    keys: torch.Tensor
    used: torch.Tensor
    live: torch.Tensor


class PlannedPass:
    """The context of one replay or observe pass: plans set on entry; on a clean exit every
    planned microbatch must have been used; routes dropped on any exit. A small class rather
    than a ``contextlib`` generator, whose machinery costs more than the pass setup itself."""

    __slots__ = ("_session", "_start_args")

    def __init__(self, session: ReplaySession, *start_args: object) -> None:
        """``start_args``: those of ``ReplaySession._start_planned_pass``, applied on entry."""
        self._session, self._start_args = session, start_args

    def __enter__(self) -> None:
        self._session._start_planned_pass(*self._start_args)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._session._finish_planned_pass()
        finally:
            self._session.reset()


class ReplaySession:
    """Controls the replay routers of one rank's model chunks."""

    def __init__(self, model: torch.nn.Module | Iterable[torch.nn.Module]) -> None:
        chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
        self._routers: dict[int, torch.nn.Module] = {}
        for chunk in chunks:
            for name, module in chunk.named_modules():
                state = getattr(module, "router_replay", None)
                if not isinstance(state, RouterReplayState):
                    continue
                layer = state.layer_number
                if layer is None:
                    raise ValueError(f"replay router {name} has no layer_number")
                if layer in self._routers:
                    raise ValueError(f"two replay routers claim layer {layer} (second: {name})")
                self._routers[layer] = module
        if not self._routers:
            raise ValueError(
                "no replay router in the model; build it from a spec passed through "
                "megatron_pr2.patch.with_replay_router"
            )
        self._layers = tuple(sorted(self._routers))
        self._model_layers = frozenset(self._layers) | config_moe_layers(
            next(iter(self._routers.values())).config
        )
        self._has_predictor = any(s.predictor is not None for s in self._states())
        first = next(iter(self._routers.values()))
        self.topk: int = first.router_replay.topk
        self._config = first.config

    @property
    def layers(self) -> list[int]:
        """Global layer numbers (1-based) of this rank's replay routers, ascending."""
        return list(self._layers)

    def state(self, layer: int) -> RouterReplayState:
        return self._routers[layer].router_replay

    def _states(self) -> Iterator[RouterReplayState]:
        return (router.router_replay for router in self._routers.values())

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def recording(
        self, token_keys: Sequence[torch.Tensor | None] | None = None
    ) -> Iterator[RouteRecord]:
        """Every router keeps the top-k of each microbatch it sees (``pr2``: the top-k of
        ``logits + predicted offset``, and caches features of sampled tokens).

        ``token_keys``: per microbatch, ``[tokens]`` int64 keys (``sample << 32 | position``,
        see ``predictor.cache.token_keys``) in the router's token order; without them tokens are
        keyed by (microbatch, row), which requires the same micro-batching in the update passes.
        With keys, ``record.by_token()`` gives routes that follow the token into passes that
        micro-batch, order or pack the samples differently.
        """
        record = RouteRecord()
        token_keys = self._on_device(token_keys)
        if token_keys is not None and all(k is not None for k in token_keys):
            record.token_keys = [k.host for k in token_keys]
        for state in self._states():
            if state.predictor is not None:
                state.predictor.start_recording()
            state.set_action(RouteAction.RECORD, token_keys=token_keys)
        try:
            yield record
            self._share_predictor_cache_keys()
            record.routes = PreparedRoutes(  # our own top-k output: valid by construction
                {
                    layer: [PlannedRoute(idx, None, len(idx)) for idx in self.state(layer).recorded]
                    for layer in self._layers
                }
            )
        finally:
            self.reset()

    def replaying(
        self,
        routes: Routes,
        token_keys: Sequence[torch.Tensor | None] | None = None,
        predictor_loss: bool = False,
        cache_features: bool = False,
        num_tokens: Sequence[int] | None = None,
    ) -> PlannedPass:
        """Force ``routes`` on every local router for one pass (forward and recompute alike).

        ``predictor_loss`` (pr2, mini-steps >= 1): add each router's predictor loss on the cached
        tokens of the batch, through megatron's aux-loss plumbing. ``cache_features`` (pr2_r3's
        old-log-prob pass): start a new feature cache and fill it, as a pr2 recording pass does.
        ``num_tokens``: the tokens each router sees per microbatch (default: the lengths of
        ``token_keys``); with either, a wrong row count in any microbatch is refused on entry,
        before the first forward, instead of when that microbatch's forward reaches a router.
        """
        return PlannedPass(
            self, RouteAction.REPLAY, routes, token_keys, predictor_loss, cache_features, num_tokens
        )

    def observing(
        self,
        routes: Routes,
        token_keys: Sequence[torch.Tensor | None] | None = None,
        num_tokens: Sequence[int] | None = None,
    ) -> PlannedPass:
        """Route live, and measure each router's live top-k against ``routes`` (the drift that
        mode ``none`` lets through; metrics as for replay, with ``routes`` as the replayed set)."""
        return PlannedPass(self, RouteAction.OBSERVE, routes, token_keys, False, False, num_tokens)

    def _start_planned_pass(
        self,
        action: RouteAction,
        routes: Routes,
        token_keys: Sequence[torch.Tensor | None] | None,
        predictor_loss: bool = False,
        cache_features: bool = False,
        num_tokens: Sequence[int] | None = None,
    ) -> None:
        """Give every local router its plan for one pass (a plain call, not a nested context
        manager: replay runs once per pass and its Python cost is part of the step)."""
        prepared = self.prepare(routes)
        if prepared.checked_for is not self._layers:
            self._check_complete(prepared.plans)
            prepared.checked_for = self._layers
        plans = prepared.plans
        keys = self._on_device(token_keys)
        if num_tokens is None and keys is not None:
            num_tokens = [len(k) if k is not None else None for k in keys]
        if num_tokens is not None:
            self._check_rows(prepared, num_tokens)
        try:
            for layer in self._layers:
                state = self._routers[layer].router_replay
                if cache_features and state.predictor is not None:
                    state.predictor.start_recording()
                state.start_prepared_pass(
                    action, plans[layer], keys, predictor_loss, cache_features
                )
        except BaseException:
            self.reset()
            raise

    def _check_complete(self, plans: Mapping[int, list[PlannedRoute | None]]) -> None:
        """Every local layer has routes, and all for the same number of microbatches."""
        missing = [layer for layer in self._layers if layer not in plans]
        if missing:
            raise ValueError(f"routes missing for local MoE layer(s) {missing}")
        counts = {len(plans[layer]) for layer in self._layers}
        if len(counts) != 1:
            per_layer = {layer: len(plans[layer]) for layer in self._layers}
            raise ValueError(f"routes give different microbatch counts per layer: {per_layer}")

    def _check_rows(self, prepared: PreparedRoutes, num_tokens: Sequence[int | None]) -> None:
        """Each microbatch's route rows against the tokens its routers will see (one compare
        per microbatch: rows are the same in every layer, see ``microbatch_rows``)."""
        rows = prepared.microbatch_rows()
        count = len(next(iter(prepared.plans.values()), ()))
        if len(num_tokens) != count:
            raise ValueError(
                f"routes for {count} microbatch(es), but the pass has {len(num_tokens)} "
                "(token keys / num_tokens)"
            )
        for mb, (got, expected) in enumerate(zip(rows, num_tokens)):
            if got is not None and expected is not None and got != expected:
                layer = next(
                    layer for layer in self._layers if prepared.plans[layer][mb] is not None
                )
                raise ValueError(
                    f"routes for layer {layer}, microbatch {mb}: expected {expected} tokens "
                    f"(rows), got {got}"
                )

    def _finish_planned_pass(self) -> None:
        """Every planned microbatch must have run; a pass that filled the feature caches
        (pr2_r3's old-log-prob pass) lets them share their keys, as a recording pass does."""
        if any(state.planned_microbatches_left for state in self._states()):
            unused = {
                layer: left
                for layer in self._layers
                if (left := self.state(layer).planned_microbatches_left)
            }
            raise RuntimeError(f"routes of some microbatches were never used: {unused}")
        if self._has_predictor and any(
            s.predictor is not None and s.predictor.cache_features for s in self._states()
        ):
            self._share_predictor_cache_keys()

    def _on_device(
        self, token_keys: Sequence[torch.Tensor | None] | None
    ) -> list[MicrobatchKeys | None] | None:
        """Token keys moved to the routers' device once per pass, not once per router call, and
        shared by every router (what derives from them is computed once per microbatch)."""
        if token_keys is None:
            return None
        device = self._routers[self._layers[0]].weight.device
        return [None if k is None else MicrobatchKeys(k, device) for k in token_keys]

    def _share_predictor_cache_keys(self) -> None:
        """After a pass that filled the feature caches: every layer cached the same tokens, so
        the caches share one sorted-key tensor and a lookup serves all layers."""
        caches = [s.predictor.cache for s in self._states() if s.predictor is not None]
        for cache in caches[1:]:
            cache.share_keys_with(caches[0])

    def prepare(self, routes: Routes, num_tokens: Sequence[int] | None = None) -> PreparedRoutes:
        """Validate external (e.g. rollout-engine) routes once per rollout batch.

        Layers of the model that are not on this rank (other pipeline stages) are ignored; a key
        that is no MoE layer of the model is refused, so misnumbered routes never go unused
        unnoticed. ``num_tokens``: the tokens each router sees per microbatch, when known.
        Raises ``ValueError`` naming layer, microbatch and token for any malformed route (see
        ``replay.routes``), and for row counts that differ between layers or from ``num_tokens``.
        """
        if isinstance(routes, PreparedRoutes):
            if num_tokens is not None:
                self._check_rows(routes, num_tokens)
            return routes
        unknown = [key for key in routes if key not in self._model_layers]
        if unknown:
            raise ValueError(
                f"routes for layer key(s) {unknown}: not MoE layers of this model "
                f"(its MoE layers: {sorted(self._model_layers)}; keys are 1-based layer numbers)"
            )
        plans = {}
        for layer in self._layers:
            if layer in routes:
                state, device = self.state(layer), self._routers[layer].weight.device
                per_mb = routes[layer]
                if num_tokens is not None and len(per_mb) != len(num_tokens):
                    raise ValueError(
                        f"routes for layer {layer}: {len(per_mb)} microbatch(es), expected "
                        f"{len(num_tokens)} (num_tokens)"
                    )
                plans[layer] = [
                    state.prepare(r, mb, device, None if num_tokens is None else num_tokens[mb])
                    for mb, r in enumerate(per_mb)
                ]
        prepared = PreparedRoutes(plans)
        prepared.microbatch_rows()  # rows must agree across layers: refused here, not mid-pass
        return prepared

    def reset(self) -> None:
        """Back to live routing and drop every route held (also after an exception)."""
        for state in self._states():
            state.reset()

    @property
    def routes_held(self) -> int:
        return sum(state.routes_held for state in self._states())

    # ------------------------------------------------------------------ metrics
    def metrics(self, group: torch.distributed.ProcessGroup | None = None) -> dict[str, float]:
        """Replay metrics since the last call, summed over ``group`` (default: all ranks).

        Token counts are de-duplicated for tensor parallelism without sequence parallelism,
        where every TP rank routes the same tokens.
        """
        num_layers = int(self._config.num_layers)
        table = torch.zeros(
            num_layers + 1, replay_metrics.num_counters(self.topk), dtype=torch.int64
        )
        for layer in self._layers:
            counters = self.state(layer).take_counters()
            if counters is not None:
                table[layer] += counters.cpu()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            table = self._all_reduce_on_router_device(table, group)
            tp_size = self._routers[self._layers[0]].tp_group.size()
            if tp_size > 1 and not self._config.sequence_parallel:
                table //= tp_size
        rows = table.tolist()  # one host read; the summary is plain Python
        per_layer = {layer: rows[layer] for layer in range(1, num_layers + 1) if any(rows[layer])}
        out = replay_metrics.summarize(per_layer, self.topk)
        out.update(self._predictor_metrics(num_layers, group))
        return out

    def _all_reduce_on_router_device(self, table: torch.Tensor, group) -> torch.Tensor:
        """All-reduce on the routers' device (NCCL needs GPU tensors), result on the host."""
        device = self._routers[self._layers[0]].weight.device
        on_device = table.to(device)
        torch.distributed.all_reduce(on_device, group=group)
        return on_device.cpu()

    def _predictor_metrics(self, num_layers: int, group) -> dict[str, float]:
        """PR2 metrics (the same collective pattern as the replay metrics)."""
        if not self._has_predictor:
            return {}
        rows = [[0.0] * predictor_state.NUM_COUNTERS for _ in range(num_layers + 1)]
        for layer in self._layers:
            if self.state(layer).predictor is not None:
                rows[layer] = self.state(layer).predictor.take_counters()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            table = torch.tensor(rows, dtype=torch.float64)
            rows = self._all_reduce_on_router_device(table, group).tolist()
        present = {layer: rows[layer] for layer in range(1, num_layers + 1) if any(rows[layer])}
        return predictor_state.summarize(present, self.topk)

    # ------------------------------------------------------------------ diagnostics
    @contextlib.contextmanager
    def tracing(self, enabled: bool = True) -> Iterator[dict[int, RouteTrace]]:
        """Trace every local router's routes of the enclosed passes (every
        ``metrics_token_stride``-th token of each call); the dict is filled on exit."""
        out: dict[int, RouteTrace] = {}
        if not enabled:
            yield out
            return
        for state in self._states():
            state.trace = []
        try:
            yield out
            for layer in self._layers:
                calls = self.state(layer).trace or []
                if calls:
                    keys, used, live = (torch.cat(parts) for parts in zip(*calls))
                    out[layer] = RouteTrace(keys, used, live)
        finally:
            for state in self._states():
                state.trace = None

    def router_weights(self) -> dict[int, torch.Tensor]:
        """Each local router's gate weight ``[experts, hidden]`` by global layer number."""
        return {layer: router.weight for layer, router in self._routers.items()}

    def predictor_parameters(self) -> list[torch.nn.Parameter]:
        return [
            router.evolution_predictor.weight
            for router in self._routers.values()
            if getattr(router, "evolution_predictor", None) is not None
        ]


def config_moe_layers(config: object) -> frozenset[int]:
    """Global 1-based MoE layer numbers of the whole model (all pipeline stages), from
    ``num_layers`` and ``moe_layer_freq`` as megatron's layer specs read them; every decoder
    layer when the pattern cannot be read."""
    num_layers = int(config.num_layers)
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        pattern = [i % freq == 0 for i in range(num_layers)]
    elif isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        pattern = [bool(p) for p in freq]
    else:
        pattern = [True] * num_layers
    return frozenset(i + 1 for i, moe in enumerate(pattern) if moe)
