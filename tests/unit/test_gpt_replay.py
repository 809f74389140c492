"""Replay through a whole megatron-core GPT (world 1): exact reproduction, recompute parity,
bounded state, metrics."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.models.gpt import lm_forward_backward
from tests.support import replay_harness as h


def test_replaying_recorded_routes_reproduces_output_and_gradients_exactly(world1):
    built = h.build("ours")
    batches = h.make_batches(3)
    live_losses = lm_forward_backward(built.chunks, batches)  # plain live routing
    live_grads = h.grads(built.chunks)
    h.zero_grads(built.chunks)

    with torch.no_grad(), built.session.recording() as record:
        lm_forward_backward(built.chunks, batches, forward_only=True)
    assert sorted(record.routes) == [1, 2, 3, 4] and record.num_microbatches == 3

    replay_losses = h.train_pass_ours(built, batches, record.routes)
    for live, replayed in zip(live_losses, replay_losses):
        assert torch.equal(live["lm_loss"], replayed["lm_loss"])
    replay_grads = h.grads(built.chunks)
    assert live_grads.keys() == replay_grads.keys()
    for name in live_grads:
        assert torch.equal(live_grads[name], replay_grads[name]), name

    metrics = built.session.metrics()
    assert metrics["router_replay/zero_deviation_ratio"] == 1.0
    assert metrics["router_replay/tokens"] == 4 * 3 * h.SEQ * h.MICRO_BATCH


def test_replayed_routes_change_the_loss_when_they_differ_from_live(world1):
    built = h.build("ours")
    batches = h.make_batches(2)
    live = lm_forward_backward(built.chunks, batches, forward_only=True)
    forced = h.train_pass_ours(built, batches, h.random_routes(2))
    assert not torch.equal(live[0]["lm_loss"], forced[0]["lm_loss"])
    assert built.session.metrics()["router_replay/zero_deviation_ratio"] < 0.5


@pytest.mark.parametrize("recompute", ["full", "selective_moe"])
def test_recompute_uses_the_routes_of_the_original_forward(world1, recompute):
    assert h.recompute_gap("ours", recompute) <= 1e-6


def test_state_holds_at_most_one_step_of_routes_over_100_steps(world1):
    built = h.build("ours", recompute="full")
    batches = h.make_batches(2)
    routes = h.random_routes(2)
    layers = built.session.layers
    most_held = 0

    for step in range(100):
        with built.session.replaying(routes):
            lm_forward_backward(built.chunks, batches)
            most_held = max(most_held, built.session.routes_held)
        assert built.session.routes_held == 0, f"step {step}: routes left behind"
        with torch.no_grad(), built.session.replaying(routes):  # forward-only pass
            lm_forward_backward(built.chunks, batches, forward_only=True)
            most_held = max(most_held, built.session.routes_held)
        assert built.session.routes_held == 0, f"step {step}: forward-only pass left routes"
        h.zero_grads(built.chunks)
    # A pass holds its plan plus the recompute queue's references to the same routes.
    one_step = 2 * len(layers) * len(batches)
    assert 0 < most_held <= one_step


def test_session_rejects_missing_layers_and_uneven_microbatch_counts(world1):
    built = h.build("ours")
    routes = h.random_routes(2)
    with pytest.raises(ValueError, match=r"routes missing for local MoE layer\(s\) \[4\]"):
        with built.session.replaying({k: v for k, v in routes.items() if k != 4}):
            pass
    routes[2] = routes[2][:1]
    with pytest.raises(ValueError, match="different microbatch counts per layer"):
        with built.session.replaying(routes):
            pass


def test_prepared_routes_are_checked_against_each_session_that_replays_them(world1):
    # Update passes reuse a passed completeness check; another session must check again.
    small = h.build("ours", num_layers=2)
    routes = {layer: per_mb for layer, per_mb in h.random_routes(2).items() if layer <= 2}
    prepared = small.session.prepare(routes)  # this model's layers 1 and 2
    for _ in range(2):
        with small.session.replaying(prepared):
            lm_forward_backward(small.chunks, h.make_batches(2))
    full = h.build("ours")
    for _ in range(2):  # a failed check is never remembered as passed
        with pytest.raises(ValueError, match=r"routes missing for local MoE layer\(s\) \[3, 4\]"):
            with full.session.replaying(prepared):
                pass
    assert full.session.routes_held == 0


def test_unused_microbatch_routes_are_an_error(world1):
    built = h.build("ours")
    with pytest.raises(RuntimeError, match="routes of some microbatches were never used"):
        with built.session.replaying(h.random_routes(3)):
            lm_forward_backward(built.chunks, h.make_batches(2))
    assert built.session.routes_held == 0
