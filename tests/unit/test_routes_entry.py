"""Issue 16 (routes): every route fault is refused when a pass starts, before any forward, and
names the first bad token whatever its fault."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.replay.routes import validate_routes
from megatron_pr2.replay.state import RouteAction
from tests.unit.test_router_replay import K, T, make_router


def _valid(rows: int) -> torch.Tensor:
    return torch.arange(K).repeat(rows, 1)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (T - 1, f"layer 1, microbatch 1: expected {T} tokens \\(rows\\), got {T - 1}"),
        (0, "layer 1, microbatch 1: expected 12 tokens \\(rows\\), got 0"),
    ],
)
def test_set_action_checks_every_microbatch_against_its_token_keys(world1, rows, message):
    router = make_router()
    keys = [torch.arange(T, dtype=torch.int64), torch.arange(T, dtype=torch.int64) + T]
    with pytest.raises(ValueError, match=message):
        router.router_replay.set_action(
            RouteAction.REPLAY, [_valid(T), _valid(rows)], token_keys=keys
        )
    assert router.router_replay.action is RouteAction.LIVE


def test_set_action_checks_explicit_token_counts(world1):
    router = make_router()
    with pytest.raises(ValueError, match=f"microbatch 1: expected {T} tokens \\(rows\\), got 5"):
        router.router_replay.set_action(
            RouteAction.REPLAY, [_valid(T), _valid(5)], num_tokens=[T, T]
        )
    with pytest.raises(ValueError, match="routes for 2 microbatch\\(es\\), but the pass has 3"):
        router.router_replay.set_action(
            RouteAction.REPLAY, [_valid(T), _valid(T)], num_tokens=[T, T, T]
        )


def test_empty_route_is_refused_without_token_counts(world1):
    router = make_router()
    with pytest.raises(ValueError, match="layer 1, microbatch 1: no rows"):
        router.router_replay.set_action(
            RouteAction.REPLAY, [_valid(T), torch.empty(0, K, dtype=torch.int64)]
        )


@pytest.mark.parametrize(
    ("rows", "token", "fault"),
    [
        ([[8, 1], [-1, 2]], 0, "out of range"),  # range fault before a partial -1 row
        ([[3, 3], [-1, 2]], 0, "duplicate expert id"),  # duplicate before a partial -1 row
        ([[0, 1], [-1, 2], [9, 9]], 1, "mixes -1"),
        ([[0, 1], [-2, 5], [1, 1]], 1, "out of range"),
    ],
)
def test_first_bad_token_over_every_kind_of_fault(rows, token, fault):
    with pytest.raises(ValueError, match=f"layer 3, microbatch 2, token {token}: .*{fault}"):
        validate_routes(
            torch.tensor(rows), layer=3, num_experts=8, topk=2, microbatch=2, num_tokens=len(rows)
        )


def test_a_row_with_several_faults_names_them_all():
    with pytest.raises(ValueError, match=r"out of range .* in \[-1, 9\]; a row mixes -1"):
        validate_routes(torch.tensor([[-1, 9]]), layer=1, num_experts=8, topk=2)


# ------------------------------------------------------------------ whole GPT, session entry
def _no_grads(chunks) -> bool:
    return all(p.grad is None for chunk in chunks for p in chunk.parameters())


@pytest.mark.parametrize("rows", [31, 0])
@pytest.mark.parametrize("told_by", ["num_tokens", "token_keys"])
def test_wrong_row_count_in_a_later_microbatch_is_refused_before_any_forward(world1, rows, told_by):
    from megatron_pr2.models.gpt import lm_forward_backward
    from tests.support import replay_harness as h

    built = h.build("ours")
    tokens = h.SEQ * h.MICRO_BATCH
    routes = h.random_routes(2)
    for layer in routes:
        routes[layer][1] = routes[layer][1][:rows]
    if told_by == "num_tokens":
        kwargs = {"num_tokens": [tokens, tokens]}
    else:
        kwargs = {"token_keys": [torch.arange(tokens) + (mb << 32) for mb in range(2)]}
    message = (
        f"layer 1, microbatch 1: expected {tokens} tokens \\(rows\\), got {rows}"
        if rows
        else "layer 1, microbatch 1: no rows"
    )
    with pytest.raises(ValueError, match=message):
        with built.session.replaying(routes, **kwargs):
            lm_forward_backward(built.chunks, h.make_batches(2))
    assert _no_grads(built.chunks), "a forward/backward ran before the bad route was refused"
    assert built.session.routes_held == 0


def test_row_count_that_differs_between_layers_is_refused_without_token_counts(world1):
    from megatron_pr2.models.gpt import lm_forward_backward
    from tests.support import replay_harness as h

    built = h.build("ours")
    routes = h.random_routes(2)
    routes[3][1] = routes[3][1][:31]
    message = "layer 3, microbatch 1: 31 rows, but layer 1 has 32 for the same tokens"
    with pytest.raises(ValueError, match=message):
        with built.session.replaying(routes):
            lm_forward_backward(built.chunks, h.make_batches(2))
    assert _no_grads(built.chunks)


def test_route_keys_the_model_does_not_have_are_refused(world1):
    from tests.support import replay_harness as h

    built = h.build("ours", num_layers=2)  # MoE layers 1 and 2
    with pytest.raises(ValueError, match=r"layer key\(s\) \[3, 4\]: .*MoE layers: \[1, 2\]"):
        built.session.prepare(h.random_routes(2))
    routes = h.random_routes(2)
    zero_based = {layer - 1: routes[layer] for layer in (1, 2)}
    with pytest.raises(ValueError, match=r"layer key\(s\) \[0\]"):
        with built.session.replaying(zero_based):
            pass
    assert built.session.routes_held == 0


def test_worker_refuses_a_short_engine_route_before_the_old_logprob_pass(world1):
    from tests.unit import test_rl_worker as rl

    worker, engine = rl.make("r3")
    rollout, batch = rl.rollout_batch(engine, seed=2)
    routes = {layer: list(per_mb) for layer, per_mb in rollout.routes.items()}
    rows = routes[1][1].shape[0]
    for per_mb in routes.values():
        per_mb[1] = per_mb[1][:-1]
    calls = []
    hook = worker.modules[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        message = f"layer 1, microbatch 1: expected {rows} tokens \\(rows\\), got {rows - 1}"
        with pytest.raises(ValueError, match=message):
            worker.get_logprobs(batch, routes)
    finally:
        hook.remove()
    assert not calls, "a forward ran before the short route was refused"
