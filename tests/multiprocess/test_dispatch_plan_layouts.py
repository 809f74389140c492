"""Planned token dispatch under EP, TP x EP (ETP) and PP x EP with recompute (gloo, real
megatron-core): outputs and every gradient identical to megatron's own dispatcher, and no count
all-gather or host synchronisation left in a replayed pass."""

from __future__ import annotations

import pytest

from tests.support.dist import Layout, init_layout


def _check(
    rank: int,
    world: int,
    layouts: list[Layout],
    modes: list[str],
    recompute: str,
    num_microbatches: int = 3,
    dispatcher: str = "alltoall",
    padded: bool = False,
) -> None:
    from tests.support import dispatch_harness as d

    for layout in layouts:
        init_layout(layout)
        for mode in modes:
            stats = d.check_planned_matches_megatron(
                mode,
                num_microbatches,
                padded=padded,
                moe_token_dispatcher_type=dispatcher,
                **d.h.RECOMPUTE[recompute],
            )
            assert stats["dispatch/planned"] > 0, (layout.name, mode, stats)
            if dispatcher == "allgather":  # megatron reads the counts on the host per call
                reads, planned = stats["megatron/host_read"], stats["dispatch/planned"]
                assert reads in (planned, 2 * planned), stats  # 0.19 adds a .item()
            elif layout.ep * (layout.etp or layout.tp) > 1:  # megatron gathers counts per call
                assert stats["megatron/count_allgather"] == stats["dispatch/planned"], stats


def _fallback_on_one_rank(rank: int, world: int) -> None:
    """-1 rows on one EP rank only: the whole group takes megatron's path for that (layer,
    microbatch) (a collective: a rank going alone would hang), and the results stay exact."""
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession
    from tests.support import dispatch_harness as d

    init_layout(Layout(ep=2))
    chunks = d.build_planned("r3")
    session, planner = ReplaySession(chunks), DispatchPlanner(chunks)
    batches = d.h.make_batches(2)
    routes = d.h.random_routes(len(batches))
    layer = planner.layers[1]
    if rank == 1:
        routes[layer][0] = routes[layer][0].clone()
        routes[layer][0][3] = -1
    plan = planner.build(routes)
    assert plan.layers[layer].planned.tolist() == [False, True]
    ref_out, ref_grads, _ = d.replay_pass(chunks, session, batches, routes)
    planner.take_stats()
    out, grads, counts = d.replay_pass(chunks, session, batches, routes, planner, plan)
    assert planner.take_stats()["dispatch/partial_routes"] == 1
    assert counts["count_allgather"] == 1 and counts["host_sync"] == 1, counts
    assert d.max_diff(ref_out, out) <= 1e-6
    assert d.h.max_grad_diff(ref_grads, grads) <= 1e-6


@pytest.mark.slow
def test_ep2_planned_dispatch_r2_r3_pr2_world2(run_dist):
    run_dist(_check, 2, [Layout(ep=2)], ["r2", "r3", "pr2"], "off")


@pytest.mark.slow
def test_ep2_unplanned_microbatch_on_one_rank_world2(run_dist):
    run_dist(_fallback_on_one_rank, 2)


@pytest.mark.slow
def test_tp2_ep2_etp2_planned_dispatch_world4(run_dist):
    run_dist(_check, 4, [Layout(tp=2, ep=2)], ["r2", "r3", "pr2"], "off")


@pytest.mark.slow
def test_pp2_ep2_full_recompute_planned_dispatch_world4(run_dist):
    run_dist(_check, 4, [Layout(pp=2, ep=2)], ["r2", "r3", "pr2"], "full")


@pytest.mark.slow
def test_pp2_vp2_full_recompute_planned_dispatch_world2(run_dist):
    """Interleaved schedule: each rank's plan covers the layers of both its model chunks."""
    run_dist(_check, 2, [Layout(pp=2, vp=2)], ["r2", "r3"], "full", 4)


@pytest.mark.slow
def test_ep2_and_tp2_ep2_planned_allgather_dispatch_world4(run_dist):
    """The all-gather dispatcher: EP2 (DP2) and TP2 x EP2 (ETP2), outputs and gradients exact,
    no host read of the tokens per expert left."""
    run_dist(
        _check, 4, [Layout(ep=2), Layout(tp=2, ep=2)], ["r2", "r3", "pr2"], "off", 3, "allgather"
    )


@pytest.mark.slow
def test_pp2_ep2_full_recompute_planned_allgather_dispatch_world4(run_dist):
    run_dist(_check, 4, [Layout(pp=2, ep=2)], ["r3", "pr2"], "full", 3, "allgather")


@pytest.mark.slow
def test_padded_zero_drop_dispatch_ep2_tp2_ep2_pp2_ep2_world4(run_dist):
    """megatron's drop-and-pad all-to-all at the plan's capacity (equal splits, fixed shapes)
    gives the dropless results: EP2 (DP2), TP2 x EP2 (ETP2), PP2 x EP2 with recompute."""
    layouts = [Layout(ep=2), Layout(tp=2, ep=2)]
    run_dist(_check, 4, layouts, ["r2", "r3", "pr2"], "off", 3, "alltoall", True)
    run_dist(_check, 4, [Layout(pp=2, ep=2)], ["r3"], "full", 3, "alltoall", True)
