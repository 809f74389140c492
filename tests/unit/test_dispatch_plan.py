"""Dispatch plans (world 1 and pure math): planned all-to-all sizes equal megatron's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_pr2.routes.dispatch_counts import (
    UNPLANNED,
    DispatchTopology,
    derive_splits,
    route_counts,
)


def _topology(ep: int, tp: int, ep_rank: int, tp_rank: int, experts: int = 8) -> DispatchTopology:
    nle = experts // ep
    return DispatchTopology(
        num_experts=experts,
        topk=2,
        ep_size=ep,
        tp_size=tp,
        tp_rank=tp_rank,
        local_expert_start=ep_rank * nle,
        num_local_experts=nle,
        group_rank=ep_rank * tp + tp_rank,
    )


def test_route_counts_marks_fallback_and_missing_routes():
    routes = [
        torch.tensor([[0, 1], [1, 3]]),
        torch.tensor([[0, 1], [-1, -1]]),
        None,
    ]
    counts = route_counts(routes, 4, [False, None, True])
    assert counts[0].tolist() == [1, 2, 0, 1]
    assert (counts[1] == UNPLANNED).all() and (counts[2] == UNPLANNED).all()


@pytest.mark.parametrize("ep,tp", [(2, 1), (2, 2), (1, 2), (4, 1)])
def test_derive_splits_matches_per_rank_definition(ep, tp):
    """Every size from its definition, rank by rank (the meaning megatron gives them)."""
    gen = np.random.default_rng(0)
    experts, microbatches = 8, 3
    gathered = gen.integers(0, 9, size=(ep * tp, microbatches, experts))
    nle = experts // ep
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            topo = _topology(ep, tp, ep_rank, tp_rank, experts)
            me = ep_rank * tp + tp_rank
            splits = derive_splits(gathered, np.full(microbatches, 5), topo)
            local = slice(ep_rank * nle, (ep_rank + 1) * nle)
            for mb in range(microbatches):
                counts = gathered[:, mb]  # [group rank, E]
                # I send to EP rank j the tokens of j's experts.
                sent = [counts[me, j * nle : (j + 1) * nle].sum() for j in range(ep)]
                # From EP rank j I receive what (ep j, my tp rank) sends to my experts.
                received = [counts[j * tp + tp_rank, local].sum() for j in range(ep)]
                # From TP rank t, what its EP peers sent to my experts in total.
                from_tp = [
                    sum(counts[j * tp + t, local].sum() for j in range(ep)) for t in range(tp)
                ]
                assert splits.input_splits[mb].tolist() == sent
                assert splits.output_splits[mb].tolist() == received
                assert splits.output_splits_tp[mb].tolist() == from_tp
                assert (
                    splits.tokens_per_local_expert[mb].tolist() == counts[:, local].sum(0).tolist()
                )
                assert splits.received_tokens[mb] == counts[:, local].sum()
                assert splits.max_count[mb] == counts.max()  # over every rank and expert
                rows = [counts[j * tp + t, local] for t in range(tp) for j in range(ep)]
                assert splits.global_tokens_per_local_expert[mb].tolist() == np.stack(rows).tolist()


def test_derive_splits_unplanned_on_one_rank_unplans_the_group():
    gathered = np.ones((2, 2, 8), dtype=np.int64)
    gathered[1, 1] = UNPLANNED
    splits = derive_splits(gathered, np.array([4, 4]), _topology(2, 1, 0, 0))
    assert splits.planned.tolist() == [True, False]


# ---------------------------------------------------------------- world 1, real megatron-core
@pytest.mark.parametrize("mode", ["r3", "r2"])
def test_planned_dispatch_identical_world1(world1, mode):
    from tests.support import dispatch_harness as d

    stats = d.check_planned_matches_megatron(mode)
    assert stats["dispatch/planned"] == 4 * 3  # 4 MoE layers x 3 microbatches
    assert stats["megatron/host_sync"] == 4 * 3


def test_planned_dispatch_with_full_recompute_world1(world1):
    from tests.support import dispatch_harness as d

    stats = d.check_planned_matches_megatron("r3", **d.h.RECOMPUTE["full"])
    assert stats["dispatch/planned"] == 2 * 4 * 3  # forward and recompute


def _planned_setup(num_microbatches: int = 2):
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession
    from tests.support import dispatch_harness as d

    chunks = d.build_planned("r3")
    session, planner = ReplaySession(chunks), DispatchPlanner(chunks)
    batches = d.h.make_batches(num_microbatches)
    return d, chunks, session, planner, batches


def test_a_wrong_plan_changes_the_result(world1):
    """Negative control: one count moved between two experts must show in the outputs."""
    d, chunks, session, planner, batches = _planned_setup()
    routes = d.h.random_routes(len(batches))
    plan = planner.build(routes)
    ref_out, _, _ = d.replay_pass(chunks, session, batches, routes, planner, plan)
    splits = plan.layers[planner.layers[0]]
    counts = splits.tokens_per_local_expert[0]
    src = int(torch.argmax(counts))
    dst = (src + 1) % len(counts)
    for table in (counts, splits.global_tokens_per_local_expert[0][0]):
        table[src] -= 1
        table[dst] += 1
    out, _, _ = d.replay_pass(chunks, session, batches, routes, planner, plan)
    assert d.max_diff(ref_out, out) > 1e-4


def test_partial_routes_fall_back_to_megatron(world1):
    d, chunks, session, planner, batches = _planned_setup(3)
    routes = d.h.random_routes(len(batches))
    first = planner.layers[0]
    routes[first][1] = routes[first][1].clone()
    routes[first][1][0] = -1  # one live row: that (layer, microbatch) cannot be planned
    plan = planner.build(routes)
    assert not plan.layers[first].planned[1]
    ref_out, ref_grads, _ = d.replay_pass(chunks, session, batches, routes)
    planner.take_stats()
    out, grads, counts = d.replay_pass(chunks, session, batches, routes, planner, plan)
    assert planner.take_stats() == {"dispatch/partial_routes": 1, "dispatch/planned": 11}
    assert counts["host_sync"] == 1
    assert d.max_diff(ref_out, out) <= 1e-6
    assert d.h.max_grad_diff(ref_grads, grads) <= 1e-6


def test_verify_catches_a_plan_for_other_routes(world1):
    d, chunks, session, planner, batches = _planned_setup()
    routes = d.h.random_routes(len(batches))
    plan = planner.build(d.h.random_routes(len(batches), seed=7))
    with pytest.raises(RuntimeError, match="differ from the dispatch plan"):
        with planner.planning(plan, verify=True), session.replaying(routes):
            d.lm_forward_backward(chunks, batches)


def test_plan_memory_is_per_layer_and_microbatch_not_per_token():
    """O(layers x microbatches x (E + tp*ep*nle)) integers: independent of the token count."""
    topo = _topology(2, 2, 1, 0)
    gathered = np.ones((4, 5, 8), dtype=np.int64)
    splits = derive_splits(gathered, np.full(5, 10_000), topo)
    # splits, tp splits, nle, tp*ep*nle, E, received tokens, max count
    per_microbatch = (2 + 2 + 2 + 4 + 4 * 4 + 8 + 1 + 1) * 8
    assert splits.nbytes == 5 * per_microbatch


def test_unsupported_configs_are_named():
    from types import SimpleNamespace

    from megatron_pr2.patch.dispatcher import unsupported_reason

    assert unsupported_reason(SimpleNamespace()) is None
    assert unsupported_reason(SimpleNamespace(moe_expert_capacity_factor=1.0)) == "capacity_factor"
    assert (
        unsupported_reason(SimpleNamespace(moe_router_padding_for_quantization=True))
        == "quantization_padding"
    )
    assert unsupported_reason(SimpleNamespace(cuda_graph_impl="local")) == "cuda_graph"


def test_live_router_under_a_plan_takes_megatron_path(world1):
    """A plan installed around a pass whose routers route live is not used (and says so)."""
    d, chunks, _session, planner, batches = _planned_setup()
    plan = planner.build(d.h.random_routes(len(batches)))
    planner.take_stats()
    with d.count_dispatch_syncs() as counts, planner.planning(plan):
        d.lm_forward_backward(chunks, batches)
    assert planner.take_stats() == {"dispatch/router_live": 4 * 2}
    assert counts["host_sync"] == 4 * 2


def test_one_plan_per_batch_serves_each_mini_step(world1):
    """Built once for 4 microbatches; a mini-step replaying microbatches 2-3 uses a slice."""
    d, chunks, session, planner, batches = _planned_setup(4)
    routes = d.h.random_routes(len(batches))
    plan = planner.build(routes)
    part = slice(2, 4)
    part_routes = {layer: per_mb[part] for layer, per_mb in routes.items()}
    ref_out, ref_grads, _ = d.replay_pass(chunks, session, batches[part], part_routes)
    planner.take_stats()
    out, grads, counts = d.replay_pass(
        chunks, session, batches[part], part_routes, planner, plan.select(part)
    )
    assert planner.take_stats() == {"dispatch/planned": 4 * 2}
    assert counts["host_sync"] == 0
    assert d.max_diff(ref_out, out) <= 1e-6
    assert d.h.max_grad_diff(ref_grads, grads) <= 1e-6
    # Another slice has the same token counts: only verify mode (a host sync) can tell.
    with pytest.raises(RuntimeError, match="differ from the dispatch plan"):
        with planner.planning(plan.select(slice(0, 2)), verify=True):
            with session.replaying(part_routes):
                d.lm_forward_backward(chunks, batches[part])


# ---------------------------------------------------------------- all-gather dispatcher
@pytest.mark.parametrize("mode", ["r3", "r2", "pr2"])
def test_planned_allgather_dispatch_identical_world1(world1, mode):
    """megatron's all-gather dispatcher reads the tokens per expert with a blocking ``.cpu()``
    in every layer's forward; from the plan, none."""
    from tests.support import dispatch_harness as d

    stats = d.check_planned_matches_megatron(mode, moe_token_dispatcher_type="allgather")
    assert stats["dispatch/planned"] == 4 * 3
    # per layer per microbatch: a .cpu() (0.16), and a .item() of its sum (0.19)
    assert stats["megatron/host_read"] in (4 * 3, 2 * 4 * 3)


def test_planned_allgather_dispatch_with_full_recompute_world1(world1):
    from tests.support import dispatch_harness as d

    overrides = {**d.h.RECOMPUTE["full"], "moe_token_dispatcher_type": "allgather"}
    stats = d.check_planned_matches_megatron("r3", **overrides)
    assert stats["dispatch/planned"] == 2 * 4 * 3
    assert stats["megatron/host_read"] in (2 * 4 * 3, 2 * 2 * 4 * 3)


def test_allgather_wrong_plan_changes_the_result(world1):
    """Negative control for the all-gather path: counts moved between experts must show."""
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession
    from tests.support import dispatch_harness as d

    chunks = d.build_planned("r3", moe_token_dispatcher_type="allgather")
    session, planner = ReplaySession(chunks), DispatchPlanner(chunks)
    batches = d.h.make_batches(2)
    routes = d.h.random_routes(len(batches))
    plan = planner.build(routes)
    ref_out, _, _ = d.replay_pass(chunks, session, batches, routes, planner, plan)
    counts = plan.layers[planner.layers[0]].tokens_per_local_expert[0]
    src = int(torch.argmax(counts))
    counts[src] -= 1
    counts[(src + 1) % len(counts)] += 1
    out, _, _ = d.replay_pass(chunks, session, batches, routes, planner, plan)
    assert d.max_diff(ref_out, out) > 1e-4


# ---------------------------------------------------------------- padded zero-drop capacity
@pytest.mark.parametrize("mode", ["r3", "r2"])
def test_padded_zero_drop_dispatch_equals_dropless_world1(world1, mode):
    """megatron's drop-and-pad dispatch with the plan's capacity (the largest count per
    expert): fixed shapes, nothing dropped, the dropless results."""
    from tests.support import dispatch_harness as d

    stats = d.check_planned_matches_megatron(mode, padded=True)
    assert stats["dispatch/planned"] == 4 * 3


def test_padded_dispatch_with_full_recompute_world1(world1):
    from tests.support import dispatch_harness as d

    stats = d.check_planned_matches_megatron("r3", padded=True, **d.h.RECOMPUTE["full"])
    assert stats["dispatch/planned"] == 2 * 4 * 3


def test_padded_capacity_is_the_largest_count_and_one_less_drops(world1):
    """The capacity is exactly the largest count (the least padding that drops nothing); a
    capacity one below it drops a token, and the outputs change."""
    d, chunks, session, planner, batches = _planned_setup()
    routes = d.h.random_routes(len(batches))
    plan = planner.build(routes)
    for layer in planner.layers:
        for mb, route in enumerate(routes[layer]):
            most = int(torch.bincount(route.reshape(-1), minlength=8).max())
            assert plan.layers[layer].max_count[mb] == most
    ref_out, ref_grads, _ = d.replay_pass(chunks, session, batches, routes)
    out, grads, counts = d.replay_pass(chunks, session, batches, routes, planner, plan, True)
    assert d.max_diff(ref_out, out) <= 1e-6 and d.h.max_grad_diff(ref_grads, grads) <= 1e-6
    assert counts["host_sync"] == counts["host_read"] == 0
    for splits in plan.layers.values():
        splits.max_count[:] -= 1
    out, _, _ = d.replay_pass(chunks, session, batches, routes, planner, plan, True)
    assert d.max_diff(ref_out, out) > 1e-4


def test_padded_dispatch_is_refused_for_the_allgather_dispatcher(world1):
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from tests.support import dispatch_harness as d

    chunks = d.build_planned("r3", moe_token_dispatcher_type="allgather")
    planner = DispatchPlanner(chunks)
    plan = planner.build(d.h.random_routes(2))
    with pytest.raises(ValueError, match="no drop-and-pad mode"):
        with planner.planning(plan, padded=True):
            pass
