"""NeMo-RL's router-replay call sequence driving our routers (world 1, tiny GPT): vLLM-shaped
``routed_experts`` -> per-layer ``set_target_indices`` -> ``REPLAY_FORWARD`` -> ``REPLAY_BACKWARD``
after the forward -> clear; -1 rows route live."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_pr2.integrations.nemo_rl import (
    clear_router_replay,
    layer_column,
    sequence_parallel_slice,
    set_targets_from_routed_experts,
)
from tests.support import replay_harness as h
from tests.unit.test_native_replay_api import LAYERS, one_hot, routing_maps, run

FALLBACK = 5  # leading tokens of each microbatch whose route vLLM did not return


def routed_experts(num_microbatches: int) -> list[torch.Tensor]:
    """Per microbatch, vLLM's shape and dtype: ``[tokens, layers, topk]`` int16, ``-1`` rows
    where a route is missing."""
    routes = h.random_routes(num_microbatches)
    out = []
    for mb in range(num_microbatches):
        stacked = torch.stack([routes[layer][mb] for layer in LAYERS], dim=1).to(torch.int16)
        stacked[:FALLBACK] = -1
        out.append(stacked)
    return out


def nemo_rl_pass(built, batches, per_mb: list[torch.Tensor], forward_only: bool = False):
    """One schedule pass driven as NeMo-RL's forward step drives replay."""

    def before(mb: int) -> None:
        set_targets_from_routed_experts(built.chunks, per_mb[mb])

    def after(mb: int) -> None:
        if not forward_only:  # training: the recompute of this forward replays its route
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    try:
        return run(built.chunks, batches, before=before, after=after, forward_only=forward_only)
    finally:
        clear_router_replay(built.chunks)


def test_routes_are_replayed_per_layer_with_live_fallback_rows(world1):
    built = h.build("ours")
    batches, per_mb = h.make_batches(2), routed_experts(2)
    with routing_maps(built.chunks) as live:
        run(built.chunks, batches, forward_only=True)
    with routing_maps(built.chunks) as maps:
        nemo_rl_pass(built, batches, per_mb, forward_only=True)
    for i, layer in enumerate(LAYERS):
        for mb in range(2):
            assert torch.equal(maps[layer][mb][:FALLBACK], live[layer][mb][:FALLBACK])
            forced = one_hot(per_mb[mb][FALLBACK:, i].long())
            assert torch.equal(maps[layer][mb][FALLBACK:], forced), (layer, mb)
    # Cleared: live again, nothing held.
    assert built.session.routes_held == 0
    with routing_maps(built.chunks) as after:
        run(built.chunks, batches, forward_only=True)
    assert all(torch.equal(after[layer][0], live[layer][0]) for layer in LAYERS)


def test_training_with_recompute_matches_the_session_replay(world1):
    """Gradients of a NeMo-RL-driven training pass under full recompute equal our session's
    replay of the same routes (the recompute took each forward's route)."""
    batches, per_mb = h.make_batches(3), routed_experts(3)
    nemo = h.build("ours", recompute="full")
    nemo_rl_pass(nemo, batches, per_mb)
    nemo_grads = h.grads(nemo.chunks)

    ours = h.build("ours", recompute="off")
    routes = {layer: [r[:, i].long() for r in per_mb] for i, layer in enumerate(LAYERS)}
    with ours.session.replaying(routes):
        run(ours.chunks, batches)
    assert h.max_grad_diff(nemo_grads, h.grads(ours.chunks)) <= 1e-6

    wrong = h.build("ours", recompute="off")  # negative control: other routes, other grads
    run(wrong.chunks, batches)
    assert h.max_grad_diff(nemo_grads, h.grads(wrong.chunks)) > 1e-4


def test_a_partial_minus_one_row_is_refused_naming_layer_and_token(world1):
    built = h.build("ours")
    bad = routed_experts(1)[0]
    bad[7, 2] = torch.tensor([-1, 3], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"layer 3.*token 7: a row mixes -1 with expert ids"):
        set_targets_from_routed_experts(built.chunks, bad)
    clear_router_replay(built.chunks)


def test_sequence_parallel_slice_is_contiguous_per_rank():
    routes = torch.arange(8).view(8, 1, 1)
    assert sequence_parallel_slice(routes, 1, 2).flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="8 route rows do not divide over 3"):
        sequence_parallel_slice(routes, 0, 3)


class _Config:
    num_layers = 4
    moe_layer_freq = (0, 1, 0, 1)  # MoE in layers 2 and 4


def test_layer_column_reads_moe_only_and_full_layouts():
    assert [layer_column(n, 2, _Config) for n in (2, 4)] == [0, 1]  # vLLM: MoE layers only
    assert [layer_column(n, 4, _Config) for n in (2, 4)] == [1, 3]  # one per decoder layer
    with pytest.raises(ValueError, match="3 layer columns; expected 2"):
        layer_column(2, 3, _Config)
