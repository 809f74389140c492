"""GRPO with planned dispatch under EP2 (world 2, data parallel 2): every metric identical to
the run with megatron's own dispatcher, and every replayed dispatcher call planned."""

from __future__ import annotations

import pytest
import torch

from tests.support.dist import Layout, init_layout

pytestmark = pytest.mark.slow

TINY = "examples/tiny/grpo_tiny.yaml"


EP2 = Layout(ep=2)


def _run(rank: int, world: int, tmp: str, modes: list[str], layout: Layout = EP2) -> None:
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train
    from tests.unit.test_rl_planned_dispatch import check_planned_run, overrides, split_dispatch

    init_layout(layout)
    for mode in modes:
        runs = []
        for planned in (False, True):
            extra = [
                f"policy.expert_model_parallel_size={layout.ep}",
                f"policy.pipeline_model_parallel_size={layout.pp}",
            ]
            cfg = load_config(TINY, overrides(mode, f"{tmp}/{mode}-{planned}", planned) + extra)
            runs.append(train(cfg))
        # per mini-step, 2 micro-batches over DP 2: 2 ranks x 2 MoE layers x 1 micro-batch
        # (EP2), or 4 ranks x 1 layer of their stage x 1 micro-batch (PP2 x EP2): 4 calls
        check_planned_run(*runs, mode, calls=4)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, split_dispatch(runs[1]))
        # the same history on every rank (timings aside)
        assert all(g == gathered[0] for g in gathered), mode


def test_ep2_grpo_with_planned_dispatch_is_identical_world2(run_dist, tmp_path):
    run_dist(_run, 2, str(tmp_path), ["r2", "r3", "pr2"])


def test_pp2_ep2_grpo_with_planned_dispatch_is_identical_world4(run_dist, tmp_path):
    """Each pipeline stage plans its own MoE layers; the counts are summed over ranks."""
    run_dist(_run, 4, str(tmp_path), ["r3", "pr2"], Layout(pp=2, ep=2))
