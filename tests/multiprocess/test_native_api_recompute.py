"""Megatron's native RouterReplay API driving our router under PP2 + full activation recompute
(multi-process gloo, 1F1B): gradients equal the no-recompute run whether the caller leaves the
action at REPLAY_FORWARD (where megatron's own replay is wrong, see test_recompute_layouts),
switches to REPLAY_BACKWARD before each backward itself, or clears the action after each
forward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support import replay_harness as h
from tests.support.dist import Layout, init_layout

TOLERANCE = 1e-6


def _global_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _native_driver_gaps(rank: int, world: int) -> None:
    init_layout(Layout(pp=2))
    forward_only = _global_max(h.recompute_gap("ours", "full", 4, driver="native"))
    switched = _global_max(h.recompute_gap("ours", "full", 4, driver="native_backward"))
    # The switch in the driver is a real one: megatron's own replay is exact with it.
    stock_switched = _global_max(h.recompute_gap("native", "full", 4, driver="native_backward"))
    # Actions cleared after each forward: 1F1B runs later forwards before earlier backwards.
    cleared = _global_max(h.recompute_gap("ours", "full", 4, driver="native_clear"))
    assert forward_only <= TOLERANCE, f"REPLAY_FORWARD only: recompute grad gap {forward_only:.3g}"
    assert switched <= TOLERANCE, f"caller-side REPLAY_BACKWARD: grad gap {switched:.3g}"
    assert stock_switched <= TOLERANCE, f"megatron's replay with the switch: {stock_switched:.3g}"
    assert cleared <= TOLERANCE, f"action cleared after each forward: grad gap {cleared:.3g}"

    # Native calls and the session give the same gradients on the same routes.
    batches, routes = h.make_batches(4), h.random_routes(4)
    native = h.build("ours", recompute="full")
    h.train_pass_native(native, batches, routes)
    session = h.build("ours", recompute="full")
    h.train_pass_ours(session, batches, routes)
    gap = _global_max(h.max_grad_diff(h.grads(native.chunks), h.grads(session.chunks)))
    assert gap <= TOLERANCE, f"native API vs session: grad gap {gap:.3g}"


@pytest.mark.slow
def test_native_api_on_our_router_is_exact_under_pp2_full_recompute(run_dist):
    run_dist(_native_driver_gaps, 2)
