"""Recompute on vs off gives identical gradients with replay active, under pipeline schedules
(multi-process gloo, real megatron-core); megatron's native replay fails the same check."""

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


def _check_layouts(rank: int, world: int, layouts: list[Layout], recompute: str) -> None:
    for layout in layouts:
        init_layout(layout)
        gap = _global_max(h.recompute_gap("ours", recompute, num_microbatches=4))
        assert gap <= TOLERANCE, f"{layout.name} {recompute}: ours recompute grad gap {gap:.3g}"


def _native_fails(rank: int, world: int) -> None:
    init_layout(Layout(pp=2))
    ours = _global_max(h.recompute_gap("ours", "full", num_microbatches=4))
    native = _global_max(h.recompute_gap("native", "full", num_microbatches=4))
    assert ours <= TOLERANCE, ours
    assert native > 1e-4, f"native replay was expected to corrupt recompute grads, gap {native}"


@pytest.mark.slow
def test_pp2_and_pp2_vp2_recompute_parity_world2(run_dist):
    run_dist(_check_layouts, 2, [Layout(pp=2), Layout(pp=2, vp=2)], "full")


@pytest.mark.slow
def test_pp2_selective_moe_recompute_parity_world2(run_dist):
    run_dist(_check_layouts, 2, [Layout(pp=2)], "selective_moe")


@pytest.mark.slow
def test_pp2_ep2_recompute_parity_world4(run_dist):
    run_dist(_check_layouts, 4, [Layout(pp=2, ep=2)], "full")


@pytest.mark.slow
def test_native_replay_gives_wrong_recompute_grads_under_1f1b(run_dist):
    run_dist(_native_fails, 2)
