"""Planned vs megatron's own token dispatch on one model (test-only).

The same model runs one replayed pass with megatron's dispatch path (no plan installed) and one
with the dispatch plan; outputs and gradients must be identical. Counting wraps megatron's own
dispatcher calls: the count all-gather (``gather_from_sequence_parallel_region`` of the 1-D
tokens-per-expert tensor) and the host synchronisation (``_maybe_dtoh_and_synchronize`` at the
dispatcher's ``cuda_sync_point``, where megatron waits on its device-to-host event).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, lm_forward_backward, moe_transformer_config
from megatron_pr2.replay.dispatch_plan import DispatchPlan, DispatchPlanner
from megatron_pr2.replay.session import ReplaySession
from tests.support import replay_harness as h


def build_planned(mode: str = "r3", seed: int = 5, **overrides: Any) -> list[GPTModel]:
    """This rank's chunks with replay routers and planned-dispatch MoE layers."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(seed)
    config = moe_transformer_config(h.SHAPE, **overrides)
    replay = RouterReplayConfig(mode=mode, metrics_token_stride=1)
    return build_model_chunks(
        config, h.SHAPE.vocab_size, h.SEQ, replay_config=replay, planned_dispatch=True
    )


#: Tensor methods that read a tensor's values on the host (a device sync on GPU).
HOST_READS = ("cpu", "item", "tolist", "numpy", "__int__", "__bool__")
DISPATCHER_FILES = ("megatron/core/transformer/moe/token_dispatcher.py", "patch/dispatcher.py")


@contextlib.contextmanager
def count_host_reads(counts: Counter[str]) -> Iterator[None]:
    """Counts host reads (``HOST_READS``) issued by the token dispatchers' own code (megatron's
    and the planned one; the caller's file decides, so the rest of the pass is not counted).
    Wraps the ``torch.Tensor`` methods themselves: a torch function mode would miss the
    recompute, which autograd runs outside the mode."""
    import sys

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(method: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.endswith(DISPATCHER_FILES):
                counts["host_read"] += 1
            return method(self, *args, **kwargs)

        return counted

    for name, method in originals.items():
        setattr(torch.Tensor, name, wrap(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def count_dispatch_syncs() -> Iterator[Counter[str]]:
    """Counts ``count_allgather`` and ``host_sync`` calls of megatron's all-to-all dispatcher,
    and ``host_read`` calls of any dispatcher (the all-gather one's blocking ``.cpu()``)."""
    from megatron.core.transformer.moe import token_dispatcher as td

    counts: Counter[str] = Counter()
    original_gather = td.gather_from_sequence_parallel_region
    original_sync = td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize

    def gather(input_: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if input_.dim() == 1 and not input_.is_floating_point():
            counts["count_allgather"] += 1
        return original_gather(input_, *args, **kwargs)

    def sync(self: Any, point: str, tokens_per_expert: Any = None) -> Any:
        if point == self.cuda_sync_point:
            counts["host_sync"] += 1
        return original_sync(self, point, tokens_per_expert)

    td.gather_from_sequence_parallel_region = gather
    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = sync
    try:
        with count_host_reads(counts):
            yield counts
    finally:
        td.gather_from_sequence_parallel_region = original_gather
        td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = original_sync


def outputs(losses: list[dict]) -> list[torch.Tensor]:
    return [v.detach().clone() for d in losses for v in d.values()]


def replay_pass(
    chunks: list[GPTModel],
    session: ReplaySession,
    batches: list,
    routes: Any,
    planner: DispatchPlanner | None = None,
    plan: DispatchPlan | None = None,
    padded: bool = False,
    **replay_kwargs: Any,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], Counter[str]]:
    """One replayed forward/backward: (loss outputs, grads, dispatcher sync counts)."""
    h.zero_grads(chunks)
    planning = (
        planner.planning(plan, verify=False, padded=padded)
        if plan is not None
        else contextlib.nullcontext()
    )
    with count_dispatch_syncs() as counts, planning, session.replaying(routes, **replay_kwargs):
        losses = lm_forward_backward(chunks, batches)
    return outputs(losses), h.grads(chunks), counts


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max([(x - y).abs().max().item() for x, y in zip(a, b, strict=True)], default=0.0)


def routes_for(mode: str, chunks: list[GPTModel], session: ReplaySession, batches: list) -> Any:
    """The routes a mode replays: given (r3), or recorded in a forward-only pass (r2, pr2)."""
    if mode == "r3":
        return h.random_routes(len(batches))
    with session.recording() as record:
        lm_forward_backward(chunks, batches, forward_only=True)
    return record.routes


def check_planned_matches_megatron(
    mode: str,
    num_microbatches: int = 3,
    tolerance: float = 1e-6,
    padded: bool = False,
    **overrides: Any,
) -> dict[str, int]:
    """Build, replay with megatron's (dropless) dispatch and with the plan (``padded``: the
    plan's zero-drop capacity); assert identical outputs, gradients, and no count all-gather /
    host sync under the plan. Returns the plan stats."""
    chunks = build_planned(mode, **overrides)
    session = ReplaySession(chunks)
    planner = DispatchPlanner(chunks)
    batches = h.make_batches(num_microbatches)
    routes = routes_for(mode, chunks, session, batches)
    plan = planner.build(routes)
    planner.take_stats()
    ref_out, ref_grads, ref_counts = replay_pass(chunks, session, batches, routes)
    assert planner.take_stats().get("dispatch/planned", 0) == 0
    out, grads, counts = replay_pass(chunks, session, batches, routes, planner, plan, padded)
    stats = planner.take_stats()
    assert max_diff(ref_out, out) <= tolerance, (mode, max_diff(ref_out, out))
    grad_gap = h.max_grad_diff(ref_grads, grads)
    assert grad_gap <= tolerance, (mode, grad_gap)
    assert ref_counts["host_sync"] + ref_counts["host_read"] > 0, ref_counts
    assert counts["host_sync"] == 0 and counts["count_allgather"] == 0, counts
    assert counts["host_read"] == 0, counts
    assert set(stats) == {"dispatch/planned"}, stats
    return {**stats, **{f"megatron/{k}": v for k, v in ref_counts.items()}}
