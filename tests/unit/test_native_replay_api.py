"""megatron-core's own RouterReplay API driving our router through a tiny GPT (world 1).

Code written against native replay must run unchanged on ``ReplayTopKRouter``: the scenarios of
megatron's router-replay tests (forced indices, recording, clearing, per-layer lists, actions
set and cleared globally or per instance), plus our fixes (route checks, live fallback rows,
metrics, recompute) and PR2 through the same calls. The PP2 recompute cases are in
``tests/multiprocess/test_native_api_recompute.py``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from packaging.version import Version

from megatron_pr2.models.gpt import lm_forward_backward, lm_forward_step
from megatron_pr2.patch.native import CompatRouterReplay
from megatron_pr2.patch.router import ReplayTopKRouter
from megatron_pr2.patch.version import megatron_core_version
from megatron_pr2.predictor.module import predictor_parameters
from megatron_pr2.predictor.optim import GROUP_MARKER, predictor_frozen_unless
from megatron_pr2.replay.keys import MicrobatchKeys
from megatron_pr2.replay.session import ReplaySession
from megatron_pr2.replay.state import in_backward_recompute
from tests.support import replay_harness as h
from tests.unit.test_predictor import build as build_pr2

A = RouterReplayAction
LAYERS = list(range(1, h.SHAPE.num_layers + 1))
TOKENS = h.SEQ * h.MICRO_BATCH


def routers(chunks) -> list[ReplayTopKRouter]:
    found = [m for chunk in chunks for m in chunk.modules() if isinstance(m, ReplayTopKRouter)]
    return sorted(found, key=lambda r: r.layer_number)


def one_hot(indices: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(indices.shape[0], h.SHAPE.num_moe_experts, dtype=torch.bool)
    return out.scatter(1, indices, True)


@contextlib.contextmanager
def routing_maps(chunks) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Each router's routing map per forward (recomputes left out), by layer."""
    maps: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}

    def hook(router, _inputs, output):
        if not in_backward_recompute():
            maps[router.layer_number].append(output[1].detach().clone())

    handles = [r.register_forward_hook(hook) for r in routers(chunks)]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def run(
    chunks,
    batches,
    before: Callable[[int], None] = lambda mb: None,
    after: Callable[[int], None] = lambda mb: None,
    forward_only: bool = False,
    on_output: Callable[[torch.Tensor], None] | None = None,
) -> list[dict]:
    """One schedule pass; ``before(mb)`` / ``after(mb)`` run around each microbatch's forward
    (where frameworks make their native replay calls)."""
    count = iter(range(len(batches)))

    def step(data_iterator, model):
        mb = next(count)
        before(mb)
        output, loss_func = lm_forward_step(data_iterator, model)
        after(mb)
        if on_output is not None and output.requires_grad:
            output.register_hook(lambda grad: on_output(grad) or grad)
        return output, loss_func

    context = torch.no_grad() if forward_only else contextlib.nullcontext()
    with context:
        return lm_forward_backward(
            chunks, batches, forward_only=forward_only, forward_step_func=step
        )


def set_microbatch(routes) -> Callable[[int], None]:
    """Native R3/R2 replay of ``routes`` ({layer: [per microbatch]}), set per microbatch."""

    def before(mb: int) -> None:
        RouterReplay.set_replay_data([routes[layer][mb] for layer in LAYERS])
        RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)

    return before


def record_natively(chunks, batches) -> dict[int, list[torch.Tensor]]:
    """Native RECORD pass (forward only), collecting get_recorded_data after each forward."""
    recorded: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}

    def after(mb: int) -> None:
        for layer, indices in zip(LAYERS, RouterReplay.get_recorded_data()):
            recorded[layer].append(indices.clone())

    RouterReplay.set_global_router_replay_action(A.RECORD)
    run(chunks, batches, after=after, forward_only=True)
    return recorded


def end_step() -> None:
    """What megatron asks of native callers after every step."""
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_indices()


# ------------------------------------------------------------------ identity and registry
def test_router_replay_is_a_registered_megatron_router_replay(world1):
    built = h.build("ours")
    states = [r.router_replay for r in routers(built.chunks)]
    assert all(type(s) is CompatRouterReplay and isinstance(s, RouterReplay) for s in states)
    assert RouterReplay.global_router_replay_instances == states  # construction = layer order
    assert [s.layer_number for s in RouterReplay.global_router_replay_instances] == LAYERS
    assert all(s.router_replay_action is None for s in states)
    assert built.session.layers == LAYERS  # the session drives the same objects


def test_dropped_models_leave_megatrons_instance_list(world1):
    """megatron's class-level list would keep every model ever built alive; ours are weak."""
    dropped = h.build("ours")
    assert len(RouterReplay.global_router_replay_instances) == len(LAYERS)
    del dropped
    gc.collect()
    assert RouterReplay.global_router_replay_instances == []
    built = h.build("ours")  # build() does not clear the list when it is given a model
    states = [r.router_replay for r in routers(built.chunks)]
    assert RouterReplay.global_router_replay_instances == states
    assert len(RouterReplay.global_router_replay_instances) == len(LAYERS)
    RouterReplay.clear_global_router_replay_instances()  # megatron's own reset still works
    assert RouterReplay.global_router_replay_instances == []
    routes = h.random_routes(1)
    with routing_maps(built.chunks) as maps:  # the session needs no registry
        h.train_pass_ours(built, h.make_batches(1), routes)
    assert torch.equal(maps[1][0], one_hot(routes[1][0]))


# ------------------------------------------------------------------ megatron's scenarios
def test_record_returns_the_live_topk_per_layer(world1):
    built = h.build("ours")
    batches = h.make_batches(2)
    with routing_maps(built.chunks) as live:
        run(built.chunks, batches, forward_only=True)
    with routing_maps(built.chunks) as during:
        recorded = record_natively(built.chunks, batches)
    for layer in LAYERS:
        for mb in range(2):
            indices = recorded[layer][mb]
            assert indices.shape == (TOKENS, h.SHAPE.moe_router_topk)
            assert torch.equal(one_hot(indices), live[layer][mb]), (layer, mb)
            assert torch.equal(during[layer][mb], live[layer][mb])  # recording changes nothing
    # The session's recording of the same pass is the same top-k.
    with torch.no_grad(), built.session.recording() as record:
        lm_forward_backward(built.chunks, batches, forward_only=True)
    for layer in LAYERS:
        for mb in range(2):
            assert torch.equal(record.routes[layer][mb], recorded[layer][mb])


def test_set_replay_data_forces_each_layers_indices(world1):
    built = h.build("ours")
    batches, routes = h.make_batches(2), h.random_routes(2)
    with routing_maps(built.chunks) as maps:
        native_losses = run(built.chunks, batches, before=set_microbatch(routes))
    end_step()
    for layer in LAYERS:
        for mb in range(2):
            assert torch.equal(maps[layer][mb], one_hot(routes[layer][mb])), (layer, mb)
    native_grads = h.grads(built.chunks)
    h.zero_grads(built.chunks)
    session_losses = h.train_pass_ours(built, batches, routes)
    for a, b in zip(native_losses, session_losses):
        assert torch.equal(a["lm_loss"], b["lm_loss"])
    assert h.max_grad_diff(native_grads, h.grads(built.chunks)) == 0.0


def test_native_calls_give_our_router_megatrons_own_results(world1):
    """The same native calls on megatron's router and on ours: same losses and gradients."""
    batches, routes = h.make_batches(2), h.random_routes(2)
    results = []
    for variant in ("native", "ours"):
        built = h.build(variant)
        losses = h.train_pass_native(built, batches, routes)
        results.append((losses, h.grads(built.chunks)))
    (native_losses, native_grads), (our_losses, our_grads) = results
    for a, b in zip(native_losses, our_losses):
        assert torch.equal(a["lm_loss"], b["lm_loss"])
    assert h.max_grad_diff(native_grads, our_grads) <= 1e-7


def test_set_replay_data_needs_one_tensor_per_instance(world1):
    built = h.build("ours")  # noqa: F841 (alive: a collected router leaves megatron's list)
    with pytest.raises(ValueError, match=r"\(3\) does not match instances \(4\)"):
        RouterReplay.set_replay_data(list(h.random_routes(1).values())[:3])


def test_clear_global_indices_drops_targets_records_and_queued_routes(world1):
    built = h.build("ours", recompute="full")
    batches, routes = h.make_batches(1), h.random_routes(1)
    record_natively(built.chunks, batches)
    RouterReplay.set_replay_data([routes[layer][0] for layer in LAYERS])
    RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)
    run(built.chunks, batches, forward_only=True)  # forward only: routes stay queued
    states = RouterReplay.global_router_replay_instances
    assert all(s.routes_held > 0 for s in states)
    RouterReplay.clear_global_indices()
    assert RouterReplay.get_recorded_data() == [None] * len(LAYERS)
    assert all(s.target_topk_idx is None and s.routes_held == 0 for s in states)
    assert all(s.router_replay_action is A.REPLAY_FORWARD for s in states)  # action kept
    with pytest.raises(RuntimeError, match="layer 1: REPLAY_FORWARD without a target"):
        run(built.chunks, batches, forward_only=True)


def test_actions_set_and_cleared_globally_and_per_instance(world1):
    built = h.build("ours")
    batches, routes = h.make_batches(1), h.random_routes(1)
    with routing_maps(built.chunks) as live:
        run(built.chunks, batches, forward_only=True)
    states = list(RouterReplay.global_router_replay_instances)

    RouterReplay.set_global_router_replay_action(A.RECORD)
    assert [s.router_replay_action for s in states] == [A.RECORD] * len(LAYERS)
    RouterReplay.clear_global_router_replay_action()
    assert [s.router_replay_action for s in states] == [None] * len(LAYERS)

    second, fourth = states[1], states[3]  # layer 2 replays, layer 4 records, 1 and 3 neither
    second.set_target_indices(routes[2][0])
    second.set_router_replay_action(A.REPLAY_FORWARD)
    fourth.set_router_replay_action(A.RECORD)
    assert [s.router_replay_action for s in states] == [None, A.REPLAY_FORWARD, None, A.RECORD]
    with routing_maps(built.chunks) as maps:
        run(built.chunks, batches, forward_only=True)
    assert torch.equal(maps[1][0], live[1][0])
    assert torch.equal(maps[2][0], one_hot(routes[2][0]))
    assert not torch.equal(maps[3][0], one_hot(routes[3][0]))
    assert torch.equal(maps[4][0], one_hot(fourth.get_recorded_indices()))
    assert [s.get_recorded_indices() is None for s in states] == [True, True, True, False]
    fourth.clear_router_replay_action()

    second.clear_router_replay_action()
    assert second.router_replay_action is None
    with routing_maps(built.chunks) as maps:
        run(built.chunks, batches, forward_only=True)
    assert all(torch.equal(maps[layer][0], live[layer][0]) for layer in LAYERS)


# ------------------------------------------------------------------ our fixes, same calls
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.float(), "expected an integer dtype"),
        (lambda r: r[:, :1], r"expected shape \[tokens, topk=2\]"),
        (lambda r: _at(r, 5, [0, 8]), r"token 5: expert id out of range \[0, 8\)"),
        (lambda r: _at(r, 5, [3, 3]), "token 5: duplicate expert id"),
        (lambda r: _at(r, 5, [-1, 3]), "token 5: a row mixes -1 with expert ids"),
    ],
)
def test_bad_targets_are_refused_when_set_naming_layer_and_token(world1, change, message):
    built = h.build("ours")  # noqa: F841 (alive: a collected router leaves megatron's list)
    data = [r[0] for r in h.random_routes(1).values()]
    data[2] = change(data[2])
    with pytest.raises(ValueError, match=rf"routes for layer 3, microbatch 0.*{message}"):
        RouterReplay.set_replay_data(data)


def _at(routes: torch.Tensor, token: int, row: list[int]) -> torch.Tensor:
    routes = routes.clone()
    routes[token] = torch.tensor(row)
    return routes


def test_row_count_that_differs_from_the_routers_tokens_is_refused(world1):
    built = h.build("ours")
    short = [r[0][:-1] for r in h.random_routes(1).values()]
    RouterReplay.set_replay_data(short)
    RouterReplay.set_global_router_replay_action(A.REPLAY_FORWARD)
    with pytest.raises(ValueError, match=f"layer 1, microbatch 0: the router sees {TOKENS}"):
        run(built.chunks, h.make_batches(1), forward_only=True)


def test_fallback_rows_route_live_and_metrics_count_them(world1):
    built = h.build("ours")
    batches, routes = h.make_batches(1), h.random_routes(1)
    with routing_maps(built.chunks) as live:
        run(built.chunks, batches, forward_only=True)
    built.session.metrics()  # drop counters of the live pass (none are kept, but be sure)
    for layer in LAYERS:
        routes[layer][0][:5] = -1
    with routing_maps(built.chunks) as maps:
        run(built.chunks, batches, before=set_microbatch(routes), forward_only=True)
    end_step()
    for layer in LAYERS:
        assert torch.equal(maps[layer][0][:5], live[layer][0][:5])
        assert torch.equal(maps[layer][0][5:], one_hot(routes[layer][0][5:]))
    metrics = ReplaySession(built.chunks).metrics()  # a session built only to read metrics
    assert metrics["router_replay/fallback_tokens"] == 5 * len(LAYERS)
    assert metrics["router_replay/tokens"] == (TOKENS - 5) * len(LAYERS)
    assert metrics["router_replay/zero_deviation_ratio"] < 0.5


@pytest.mark.parametrize("driver", ["native", "native_backward"])
def test_recompute_replays_the_forwards_route_through_native_calls(world1, driver):
    assert h.recompute_gap("ours", "full", num_microbatches=3, driver=driver) <= 1e-6


def test_recompute_keeps_the_route_when_the_action_is_cleared_before_backward(world1):
    """A caller that clears the action right after each forward: its recompute (under no
    action) still replays that forward's route; megatron's own replay would route live."""
    batches, routes = h.make_batches(3), h.random_routes(3)
    results = []
    for recompute in ("off", "full"):
        built = h.build("ours", recompute=recompute)
        run(
            built.chunks,
            batches,
            before=set_microbatch(routes),
            after=lambda mb: RouterReplay.clear_global_router_replay_action(),
        )
        end_step()
        results.append(h.grads(built.chunks))
    assert h.max_grad_diff(*results) <= 1e-6


def test_a_record_pass_leaves_no_queued_routes_for_the_replay_pass_that_follows(world1):
    """R2 by native calls without clear_global_indices between the forward-only RECORD pass and
    the training REPLAY pass: the recompute still takes the replayed routes, not recorded ones."""
    batches, routes = h.make_batches(2), h.random_routes(2)
    results = []
    for recompute in ("off", "full"):
        built = h.build("ours", recompute=recompute)
        record_natively(built.chunks, batches)  # queues the live routes of two forwards
        run(built.chunks, batches, before=set_microbatch(routes))
        end_step()
        results.append(h.grads(built.chunks))
    assert h.max_grad_diff(*results) <= 1e-6


@pytest.mark.skipif(
    megatron_core_version() < Version("0.19"), reason="static buffers are new in 0.19"
)
def test_recorded_indices_land_in_megatrons_static_buffers(world1):
    """0.19's CUDA-graph inference path reads the static buffer itself, not get_recorded_data:
    the copy happens in the forward."""
    built = h.build("ours")
    batches = h.make_batches(1)
    with routing_maps(built.chunks) as live:
        run(built.chunks, batches, forward_only=True)
    buffer = torch.full((TOKENS + 3, len(LAYERS), h.SHAPE.moe_router_topk), -7)
    RouterReplay.set_global_static_buffers(buffer)
    RouterReplay.set_global_router_replay_action(A.RECORD)
    run(built.chunks, batches, forward_only=True)
    for i, layer in enumerate(LAYERS):
        assert torch.equal(one_hot(buffer[:TOKENS, i]), live[layer][0]), layer
    assert (buffer[TOKENS:] == -7).all()
    recorded = RouterReplay.get_recorded_data()
    assert all(r.data_ptr() == buffer[:, i].data_ptr() for i, r in enumerate(recorded))
    RouterReplay.clear_global_static_buffers()
    end_step()


def test_inference_mode_recording_holds_one_step_of_routes(world1):
    """Like 0.19's inference engine: RECORD set before every step under inference_mode, never
    cleared; each router keeps a bounded number of routes (no backward can need old ones)."""
    built = h.build("ours")
    batches = h.make_batches(1)
    states = list(RouterReplay.global_router_replay_instances)
    with torch.inference_mode():
        for _ in range(5):
            RouterReplay.set_global_router_replay_action(A.RECORD)
            run(built.chunks, batches, forward_only=True)
            # This step's record and its FIFO entry, and the step before's record (megatron
            # keeps it until overwritten): a bound that does not grow with the steps.
            assert all(s.routes_held <= 3 for s in states)
    assert RouterReplay.get_recorded_data()[0].shape == (TOKENS, h.SHAPE.moe_router_topk)
    end_step()


# ------------------------------------------------------------------ PR2 through native calls
def test_pr2_record_returns_the_predicted_topk(world1):
    """mode=pr2: RECORD records top-k(logits + predictor offset), as the session records it."""
    chunks, session = build_pr2("pr2")
    with torch.no_grad():
        for p in predictor_parameters(chunks):
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    batches = h.make_batches(2)
    with routing_maps(chunks) as live:
        run(chunks, batches, forward_only=True)
    recorded = record_natively(chunks, batches)
    end_step()
    with torch.no_grad(), session.recording() as record:
        lm_forward_backward(chunks, batches, forward_only=True)
    differs = 0
    for layer in LAYERS:
        for mb in range(2):
            assert torch.equal(recorded[layer][mb], record.routes[layer][mb]), (layer, mb)
            differs += int((one_hot(recorded[layer][mb]) != live[layer][mb]).any(1).sum())
    assert differs > 0  # the offset moved some tokens off the live top-k


MINI_STEPS, PER_MINI_STEP = 2, 2


def _adamw(chunks) -> torch.optim.Optimizer:
    """A framework's own optimizer: the predictor in a group marked as ours (decay on, so a
    step that is not frozen visibly moves it even with a zero gradient)."""
    predictor = predictor_parameters(chunks)
    ids = {id(p) for p in predictor}
    policy = [p for c in chunks for p in c.parameters() if id(p) not in ids]
    return torch.optim.AdamW(
        [
            {"params": policy},
            {"params": predictor, "lr": 1e-2, GROUP_MARKER: True},
        ],
        lr=1e-3,
        weight_decay=0.1,
    )


def _keys(mb: int) -> torch.Tensor:
    return MicrobatchKeys.positional(mb, TOKENS, "cpu").host


def _pr2_run(driver: str, first_microbatch_of: Callable[[int], int] = lambda i: i * PER_MINI_STEP):
    """A pr2 step: record pass, then mini-steps, each with an optimizer step; the predictor's
    gradient and weights before/after each step.

    ``native``: only megatron's calls, plus the two per-mini-step calls a framework makes for
    pr2. ``session``: our session, tokens keyed by their microbatch's index in the batch.
    """
    batches = h.make_batches(MINI_STEPS * PER_MINI_STEP)
    chunks, session = build_pr2("pr2")
    with torch.no_grad():
        for p in predictor_parameters(chunks):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    if driver == "native":
        routes = record_natively(chunks, batches)
        end_step()
    else:
        with torch.no_grad(), session.recording([_keys(mb) for mb in range(len(batches))]) as rec:
            lm_forward_backward(chunks, batches, forward_only=True)
        routes = rec.routes
    optimizer = _adamw(chunks)
    steps = []
    for i in range(MINI_STEPS):
        part = slice(i * PER_MINI_STEP, (i + 1) * PER_MINI_STEP)
        mini_routes = {layer: routes[layer][part] for layer in LAYERS}
        optimizer.zero_grad(set_to_none=True)
        if driver == "native":
            CompatRouterReplay.start_pr2_mini_step(i, first_microbatch_of(i))  # call 1
            run(chunks, batches[part], before=set_microbatch(mini_routes))
            end_step()
        else:
            mini_keys = [_keys(mb) for mb in range(part.start, part.stop)]
            with session.replaying(mini_routes, mini_keys, predictor_loss=i >= 1):
                lm_forward_backward(chunks, batches[part])
        grads = [None if p.grad is None else p.grad.clone() for p in predictor_parameters(chunks)]
        before = [p.detach().clone() for p in predictor_parameters(chunks)]
        with predictor_frozen_unless(optimizer, active=i >= 1):  # call 2
            optimizer.step()
        after = [p.detach().clone() for p in predictor_parameters(chunks)]
        steps.append({"grads": grads, "before": before, "after": after})
    return steps


def test_pr2_mini_steps_driven_by_native_calls_train_the_predictor_as_our_trainer_does(world1):
    steps = _pr2_run("native")
    # Mini-step 0: no predictor loss, and the frozen group moves neither by Adam nor by decay.
    assert all(g is None or g.abs().sum() == 0 for g in steps[0]["grads"])
    for before, after in zip(steps[0]["before"], steps[0]["after"]):
        assert torch.equal(before, after)
    # Mini-step 1: every layer's predictor has a gradient and moves.
    assert all(g is not None and g.abs().sum() > 0 for g in steps[1]["grads"])
    assert all(not torch.equal(b, a) for b, a in zip(steps[1]["before"], steps[1]["after"]))
    # The same gradients and weights as the session's, whose token keys pair each token with
    # its own cached features.
    reference = _pr2_run("session")
    for native, ours in zip(steps, reference):
        for a, b in zip(native["grads"], ours["grads"]):
            assert (a is None) == (b is None) or (a if b is None else b).abs().sum() == 0
            if a is not None and b is not None:
                assert torch.allclose(a, b, rtol=0, atol=1e-7)
        for a, b in zip(native["after"], ours["after"]):
            assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_pr2_mini_step_without_its_first_microbatch_pairs_the_wrong_tokens(world1):
    """Negative control for the pairing above: mini-step 1 keyed as if it held the first
    microbatches of the recording gives a different predictor gradient."""
    right = _pr2_run("native")[1]["grads"]
    wrong = _pr2_run("native", first_microbatch_of=lambda i: 0)[1]["grads"]
    assert any(not torch.allclose(a, b) for a, b in zip(right, wrong))
