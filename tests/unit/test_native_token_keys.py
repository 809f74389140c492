"""Token keys through megatron's native replay calls (world 1, tiny GPT, full recompute).

A framework that records with ``RouterReplay.get_recorded_data()`` in one micro-batching and
replays in another passes the recorded rows once with their ``(sample, position)`` keys
(``CompatRouterReplay.set_replay_data(..., token_keys=...)``) and, before each forward, the keys
of that microbatch (``CompatRouterReplay.set_global_token_keys``): every token takes its own
recorded route, and the gradients equal those of replaying in the recorded order. In pr2 the
same keys pair a mini-step's tokens with the features the RECORD pass cached for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_pr2.models.gpt import lm_forward_backward
from megatron_pr2.patch.native import CompatRouterReplay
from megatron_pr2.predictor.module import predictor_parameters
from tests.support import replay_harness as h
from tests.unit.test_native_replay_api import LAYERS, one_hot, routing_maps
from tests.unit.test_predictor import build as build_pr2
from tests.unit.test_token_routes import (
    PACKED,
    PERMUTED,
    RECORDED,
    bshd,
    by_key,
    forward_step,
    packed,
)

A = RouterReplayAction


def native_pass(
    chunks,
    batches,
    before: Callable[[int], None] = lambda mb: None,
    after: Callable[[int], None] = lambda mb: None,
    forward_only: bool = False,
) -> None:
    """One schedule pass; ``before(mb)`` / ``after(mb)`` around each forward (where a framework
    makes its native calls)."""
    count = iter(range(len(batches)))

    def step(data_iterator, model):
        mb = next(count)
        before(mb)
        output = forward_step(data_iterator, model)
        after(mb)
        return output

    context = torch.no_grad() if forward_only else contextlib.nullcontext()
    with context:
        lm_forward_backward(chunks, batches, forward_only=forward_only, forward_step_func=step)


def end_step() -> None:
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_indices()


def record_natively_then_drift():
    """R2's old-log-prob pass with native calls only, micro-batch 4 in sample order; then the
    router weights move (as an update would), so live routes differ from the recorded ones."""
    built = h.build("ours", recompute="full")
    batches, keys = bshd(RECORDED)
    recorded: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}

    def after(mb: int) -> None:
        for layer, indices in zip(LAYERS, RouterReplay.get_recorded_data()):
            recorded[layer].append(indices.clone())

    RouterReplay.set_global_router_replay_action(A.RECORD)
    native_pass(built.chunks, batches, after=after, forward_only=True)
    end_step()
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for weight in built.session.router_weights().values():
            weight.add_(torch.randn(weight.shape, generator=g) * weight.std())
    return built, recorded, keys


def replay_positionally(built, routes) -> None:
    """megatron's own calls: each microbatch's rows set before its forward."""

    def before(mb: int) -> None:
        RouterReplay.set_replay_data([routes[layer][mb] for layer in LAYERS])
        RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)

    return before


def replay_by_token(recorded, recorded_keys, keys) -> tuple[Callable, Callable]:
    """Our keyword: the whole batch's rows given once with their keys; per forward, its keys."""

    def start() -> None:
        CompatRouterReplay.set_replay_data(
            [torch.cat(recorded[layer]) for layer in LAYERS], token_keys=torch.cat(recorded_keys)
        )
        RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)

    def before(mb: int) -> None:
        CompatRouterReplay.set_global_token_keys(keys[mb])

    return start, before


@pytest.mark.parametrize("layout", ["permuted", "packed"])
def test_native_calls_with_token_keys_replay_each_tokens_route_and_gradients(world1, layout):
    built, recorded, rec_keys = record_natively_then_drift()
    same_batches, _ = bshd(RECORDED)
    native_pass(built.chunks, same_batches, before=replay_positionally(built, recorded))
    end_step()
    same = h.grads(built.chunks)
    h.zero_grads(built.chunks)

    batches, keys = bshd(PERMUTED) if layout == "permuted" else packed(PACKED, True)
    with routing_maps(built.chunks) as live_maps:
        native_pass(built.chunks, batches, forward_only=True)
    live = by_key(keys, live_maps)
    start, before = replay_by_token(recorded, rec_keys, keys)
    start()
    with routing_maps(built.chunks) as maps:
        native_pass(built.chunks, batches, before=before)
    end_step()
    got = by_key(keys, maps)
    moved = 0
    for layer in LAYERS:
        expected = {
            int(k): one_hot(r)[i]
            for ks, r in zip(rec_keys, recorded[layer])
            for i, k in enumerate(ks.tolist())
        }
        assert got[layer].keys() == expected.keys()
        for key, row in got[layer].items():
            assert torch.equal(row, expected[key]), (layer, key)
            moved += int(not torch.equal(row, live[layer][key]))
    assert moved > 0  # the drift moved some tokens: replay is what fixed them
    assert h.max_grad_diff(same, h.grads(built.chunks)) <= 1e-6
    assert all(s.routes_held == 0 for s in RouterReplay.global_router_replay_instances)

    # Negative control: megatron's positional calls with the recorded rows cut to this
    # micro-batching give other tokens' routes, and other gradients.
    h.zero_grads(built.chunks)
    rows = [len(k) for k in keys]
    by_position = {layer: list(torch.cat(recorded[layer]).split(rows)) for layer in LAYERS}
    native_pass(built.chunks, batches, before=replay_positionally(built, by_position))
    end_step()
    assert h.max_grad_diff(same, h.grads(built.chunks)) > 1e-4


def test_padding_keys_route_live_and_unknown_keys_are_refused(world1):
    built, recorded, rec_keys = record_natively_then_drift()
    batches, keys = bshd([[1, 0]])
    with routing_maps(built.chunks) as live:
        native_pass(built.chunks, batches, forward_only=True)
    padded = keys[0].clone()
    padded[:3] = -1  # the first three tokens are padding: routed live
    start, _ = replay_by_token(recorded, rec_keys, [padded])
    start()
    with routing_maps(built.chunks) as maps:
        native_pass(
            built.chunks,
            batches,
            before=lambda mb: CompatRouterReplay.set_global_token_keys(padded),
            forward_only=True,
        )
    for layer in LAYERS:
        assert torch.equal(maps[layer][0][:3], live[layer][0][:3])
        key = int(keys[0][3])
        expected = {int(k): r for ks, rs in zip(rec_keys, recorded[layer]) for k, r in zip(ks, rs)}
        assert torch.equal(maps[layer][0][3], one_hot(expected[key][None])[0])

    unknown = keys[0].clone()
    unknown[5] = (9 << 32) | 2  # sample 9 was never recorded
    with pytest.raises(ValueError, match=r"token key \d+ \(sample 9, position 2\) never recorded"):
        CompatRouterReplay.set_global_token_keys(unknown)
    with pytest.raises(ValueError, match="layer 1: token_keys must be int64, one per route row"):
        CompatRouterReplay.set_replay_data(
            [torch.cat(recorded[layer]) for layer in LAYERS], token_keys=rec_keys[0]
        )
    end_step()
    assert all(s.routes_held == 0 for s in RouterReplay.global_router_replay_instances)


def test_keys_set_before_the_action_change_belong_to_the_next_forward(world1):
    """NeMo-RL sets a microbatch's targets before arming the action: keys given then (the
    first microbatch of a pass) must survive the switch to REPLAY_FORWARD, both as the target
    and as the forward's keys (what pr2's feature pairing and the padding metrics read)."""
    built, recorded, rec_keys = record_natively_then_drift()
    batches, keys = bshd([[6, 3]])
    CompatRouterReplay.set_replay_data(
        [torch.cat(recorded[layer]) for layer in LAYERS], token_keys=torch.cat(rec_keys)
    )
    CompatRouterReplay.set_global_token_keys(keys[0])
    RouterReplay.set_global_router_replay_action(A.RECORD)  # another pass first
    RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)
    for state in RouterReplay.global_router_replay_instances:
        forward_keys = state.microbatch_keys(0, len(keys[0]), torch.device("cpu"))
        assert torch.equal(forward_keys.host, keys[0]), state.layer_number
    with routing_maps(built.chunks) as maps:
        native_pass(built.chunks, batches, forward_only=True)
    for layer in LAYERS:
        expected = {int(k): r for ks, rs in zip(rec_keys, recorded[layer]) for k, r in zip(ks, rs)}
        rows = torch.stack([expected[int(k)] for k in keys[0]])
        assert torch.equal(maps[layer][0], one_hot(rows))
    end_step()


def _pr2_predictor_grads(driver: str) -> list[torch.Tensor]:
    """pr2: record with micro-batch 4, then one mini-step with predictor loss, micro-batch 2
    permuted; the predictor's gradients. ``native``: megatron's calls plus our token keys;
    ``session``: ``ReplaySession`` with the same keys (the reference pairing)."""
    chunks, session = build_pr2("pr2")
    with torch.no_grad():
        for p in predictor_parameters(chunks):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    rec_batches, rec_keys = bshd(RECORDED)
    batches, keys = bshd(PERMUTED)
    if driver == "native":
        recorded: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}

        def after(mb: int) -> None:
            for layer, indices in zip(LAYERS, RouterReplay.get_recorded_data()):
                recorded[layer].append(indices.clone())

        RouterReplay.set_global_router_replay_action(A.RECORD)
        native_pass(
            chunks,
            rec_batches,
            before=lambda mb: CompatRouterReplay.set_global_token_keys(rec_keys[mb]),
            after=after,
            forward_only=True,
        )
        CompatRouterReplay.start_pr2_mini_step(1, 0)
        start, before = replay_by_token(recorded, rec_keys, keys)
        start()
        native_pass(chunks, batches, before=before)
        end_step()
    else:
        with torch.no_grad(), session.recording(rec_keys) as record:
            native_pass(chunks, rec_batches, forward_only=True)
        with session.replaying(record.by_token().plan(keys), keys, predictor_loss=True):
            native_pass(chunks, batches)
    return [p.grad.clone() for p in predictor_parameters(chunks)]


def test_pr2_mini_step_pairs_tokens_with_their_cached_features_by_key(world1):
    """The mini-step micro-batches and orders the samples unlike the RECORD pass: with keys
    given through the native calls, the predictor loss pairs each token with the features
    cached for it, as the session does."""
    native = _pr2_predictor_grads("native")
    reference = _pr2_predictor_grads("session")
    assert all(g.abs().sum() > 0 for g in native)
    for a, b in zip(native, reference):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
