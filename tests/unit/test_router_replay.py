"""ReplayTopKRouter on real megatron-core (world 1): forced sets, gate weights and router
gradients against a hand computation from live scores, for every score function."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import TinyMoEShape, moe_transformer_config
from megatron_pr2.replay.state import RouteAction

E, K, H, S, B = 8, 2, 16, 6, 2
T = S * B

SCORE_FUNCTIONS = {
    "softmax_post": dict(moe_router_score_function="softmax"),
    "softmax_pre": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid_expert_bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
    ),
    "softmax_scaled": dict(moe_router_score_function="softmax", moe_router_topk_scaling_factor=2.5),
    "group_limited": dict(
        moe_router_score_function="sigmoid",
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_enable_expert_bias=True,
    ),
}


def make_router(collect_metrics=True, **overrides):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_pr2.patch import ReplayTopKRouter

    shape = TinyMoEShape(hidden_size=H, num_moe_experts=E, moe_router_topk=K, num_layers=1)
    config = moe_transformer_config(shape, **overrides)
    router = ReplayTopKRouter(
        config,
        pg_collection=get_default_pg_collection(),
        replay_config=RouterReplayConfig(
            mode="r3", collect_metrics=collect_metrics, metrics_token_stride=1
        ),
    )
    router.set_layer_number(1)
    if router.expert_bias is not None:  # make the bias matter for live selection
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    return router


def expected_probs(logits, routes, overrides):
    """Gate weights from live logits gathered on the forced set, written out by hand."""
    picked = logits.gather(1, routes)
    if overrides.get("moe_router_score_function") == "sigmoid":
        scores = torch.sigmoid(picked)
        probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    elif overrides.get("moe_router_pre_softmax"):
        probs = torch.softmax(logits, dim=-1).gather(1, routes)
    else:
        probs = torch.softmax(picked, dim=-1)
    probs = probs * overrides.get("moe_router_topk_scaling_factor", 1.0)
    return torch.zeros(logits.shape, dtype=probs.dtype).scatter(1, routes, probs)


def off_live_routes(logits: torch.Tensor) -> torch.Tensor:
    """Routes that are NOT the live top-k: the k lowest-logit experts of every token."""
    return logits.topk(K, dim=1, largest=False).indices


@pytest.mark.parametrize("name", sorted(SCORE_FUNCTIONS))
def test_forced_set_gate_weights_and_router_grad_match_hand_computation(world1, name):
    overrides = SCORE_FUNCTIONS[name]
    router = make_router(**overrides)
    hidden = torch.randn(S, B, H)
    with torch.no_grad():
        routes = off_live_routes(hidden.view(T, H) @ router.weight.t())
    router.router_replay.set_action(RouteAction.REPLAY, [routes])

    grad_out = torch.randn(T, E)
    probs, routing_map = router(hidden)
    (probs * grad_out).sum().backward()

    # The forced set is exactly the replayed routes.
    forced = torch.zeros(T, E, dtype=torch.bool).scatter(1, routes, True)
    assert torch.equal(routing_map, forced)

    # Gate weights and router-weight gradient from the live scores, computed by hand.
    weight = router.weight.detach().clone().requires_grad_(True)
    hand = expected_probs(hidden.view(T, H) @ weight.t(), routes, overrides)
    (hand * grad_out).sum().backward()
    torch.testing.assert_close(probs, hand.detach(), rtol=1e-6, atol=1e-7)
    assert router.weight.grad.abs().sum() > 0, "replay must not cut the router's gradient"
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)


def test_record_then_replay_reproduces_live_routing(world1):
    router = make_router()
    hidden = torch.randn(S, B, H)
    router.router_replay.set_action(RouteAction.RECORD)
    live_probs, live_map = router(hidden)
    recorded = router.router_replay.recorded
    assert len(recorded) == 1 and recorded[0].shape == (T, K)

    router.router_replay.set_action(RouteAction.REPLAY, recorded)
    probs, routing_map = router(hidden)
    assert torch.equal(routing_map, live_map)
    assert torch.equal(probs, live_probs)


def test_all_minus_one_rows_fall_back_to_live_router_and_are_counted(world1):
    router = make_router()
    hidden = torch.randn(S, B, H)
    with torch.no_grad():
        logits = hidden.view(T, H) @ router.weight.t()
    routes = off_live_routes(logits)
    routes[[0, 5]] = -1
    router.router_replay.set_action(RouteAction.REPLAY, [routes])
    _, routing_map = router(hidden)

    live = logits.topk(K, dim=1).indices
    for token in range(T):
        expected = live[token] if token in (0, 5) else routes[token]
        assert set(routing_map[token].nonzero().flatten().tolist()) == set(expected.tolist())
    counters = router.router_replay.take_counters()
    from megatron_pr2.replay import metrics

    n = metrics.counts(counters, K)
    assert n["fallback"] == 2
    assert n["tokens"] == T - 2  # fallbacks excluded from agreement


def test_replay_metrics_count_deviation_from_live_topk(world1):
    router = make_router()
    hidden = torch.randn(S, B, H)
    with torch.no_grad():
        live = (hidden.view(T, H) @ router.weight.t()).topk(K, dim=1).indices
    routes = live.clone()
    routes[:4, 1] = off_live_routes(hidden.view(T, H) @ router.weight.t())[:4, 0]  # 1 differs
    router.router_replay.set_action(RouteAction.REPLAY, [routes])
    router(hidden)
    from megatron_pr2.replay import metrics

    summary = metrics.summarize({1: router.router_replay.take_counters()}, topk=K)
    assert summary["router_replay/zero_deviation_ratio"] == pytest.approx((T - 4) / T)
    assert summary["router_replay/topk_deviation_1"] == pytest.approx(4 / T)
    assert summary["router_replay/replay_agreement"] == pytest.approx(1 - 4 / (T * K))


def test_bad_route_is_refused_before_any_forward(world1):
    router = make_router()
    routes = torch.zeros(T, K, dtype=torch.int64)
    routes[:, 1] = 1
    routes[7] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="layer 1, microbatch 0, token 7: duplicate expert id"):
        router.router_replay.set_action(RouteAction.REPLAY, [routes])


@pytest.mark.parametrize("rows", [T + 1, T - 1])  # fewer rows would silently drop tokens
def test_token_count_mismatch_names_layer_and_microbatch(world1, rows):
    router = make_router()
    routes = torch.arange(K).repeat(rows, 1)
    router.router_replay.set_action(RouteAction.REPLAY, [routes])
    message = f"layer 1, microbatch 0: the router sees {T} tokens, the routes have {rows} rows"
    with pytest.raises(ValueError, match=message):
        router(torch.randn(S, B, H))


def test_surplus_forward_is_an_error(world1):
    router = make_router()
    router.router_replay.set_action(RouteAction.REPLAY, [torch.arange(K).repeat(T, 1)])
    router(torch.randn(S, B, H))
    with pytest.raises(RuntimeError, match="layer 1: forward #2 but routes were given for 1"):
        router(torch.randn(S, B, H))


def test_native_replay_instance_is_replaced_by_ours(world1):
    """moe_enable_routing_replay=True also builds megatron's own instance: it is unhooked, and
    the only registered instance is ours (a RouterReplay that is our replay state)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_pr2.patch.native import CompatRouterReplay

    router = make_router(moe_enable_routing_replay=True)
    assert RouterReplay.global_router_replay_instances == [router.router_replay]
    assert type(router.router_replay) is CompatRouterReplay


# ---------------------------------------------------------------- what side losses see
def test_aux_loss_uses_live_topk_and_expert_bias_counts_use_replayed_map(world1):
    """Documented semantics: the load-balancing aux loss is computed by megatron from its own
    live top-k (not the replayed set), so its gradient is the same with and without replay;
    the expert-bias token counts use the replayed map."""
    overrides = dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
    )
    hidden = torch.randn(S, B, H)

    def run(replay: bool):
        torch.manual_seed(7)  # same router weights in both runs
        router = make_router(**overrides)
        with torch.no_grad():
            routes = off_live_routes(hidden.view(T, H) @ router.weight.t())
        if replay:
            router.router_replay.set_action(RouteAction.REPLAY, [routes])
        probs, _ = router(hidden)
        (probs * 0).sum().backward()  # only the attached aux loss sends gradient
        return router.weight.grad.clone(), router.local_tokens_per_expert.clone(), routes

    live_grad, live_counts, _ = run(replay=False)
    replay_grad, replay_counts, routes = run(replay=True)
    assert live_grad.abs().sum() > 0
    torch.testing.assert_close(replay_grad, live_grad)  # aux loss: live top-k either way
    expected_counts = torch.bincount(routes.flatten(), minlength=E).float()
    torch.testing.assert_close(replay_counts, expected_counts)  # bias counts: replayed map
    assert not torch.equal(replay_counts, live_counts)


def test_z_loss_sees_the_same_logits_under_replay(world1):
    def run(replay: bool):
        torch.manual_seed(7)
        router = make_router(moe_z_loss_coeff=1e-2)
        hidden = torch.ones(S, B, H)
        if replay:
            with torch.no_grad():
                routes = off_live_routes(hidden.view(T, H) @ router.weight.t())
            router.router_replay.set_action(RouteAction.REPLAY, [routes])
        probs, _ = router(hidden)
        (probs * 0).sum().backward()
        return router.weight.grad.clone()

    live, replayed = run(False), run(True)
    assert live.abs().sum() > 0
    torch.testing.assert_close(replayed, live)


def test_metrics_token_stride_samples_every_nth_token(world1):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_pr2.patch import ReplayTopKRouter
    from megatron_pr2.replay import metrics

    shape = TinyMoEShape(hidden_size=H, num_moe_experts=E, moe_router_topk=K, num_layers=1)
    router = ReplayTopKRouter(
        moe_transformer_config(shape),
        pg_collection=get_default_pg_collection(),
        replay_config=RouterReplayConfig(mode="r3", metrics_token_stride=4),
    )
    router.set_layer_number(1)
    hidden = torch.randn(S, B, H)
    with torch.no_grad():
        routes = off_live_routes(hidden.view(T, H) @ router.weight.t())
    router.router_replay.set_action(RouteAction.REPLAY, [routes])
    router(hidden)
    counters = router.router_replay.take_counters()
    n = metrics.counts(counters, K)
    assert n["tokens"] == len(range(0, T, 4))  # every 4th row
    assert n["dev0"] == 0  # lowest-logit routes never match the live top-k


def test_padding_rows_are_excluded_from_replay_metrics(world1):
    """Padding tokens carry negative token keys (routes.layout); they are replayed like any row
    but never counted in agreement, deviation or fallback metrics."""
    from megatron_pr2.replay import metrics

    router = make_router()
    hidden = torch.randn(S, B, H)
    with torch.no_grad():
        routes = off_live_routes(hidden.view(T, H) @ router.weight.t())
    routes[1] = -1  # a fallback row that is also padding: not counted either
    keys = torch.arange(T, dtype=torch.int64)
    keys[[1, 2, 3]] = -torch.tensor([2, 3, 4])
    router.router_replay.set_action(RouteAction.REPLAY, [routes], token_keys=[keys])
    router(hidden)
    counters = router.router_replay.take_counters()
    n = metrics.counts(counters, K)
    assert n["tokens"] == T - 3
    assert n["fallback"] == 0


@pytest.mark.parametrize("name", sorted(SCORE_FUNCTIONS))
def test_predicted_topk_shortcut_equals_megatrons_selection(world1, name):
    """Patch-point canary for the PR2 predicted route: where the router takes ``torch.topk`` of
    the raw logits itself (softmax after top-k, no groups), megatron's routing function must
    pick the same experts; every other score config goes through megatron's function."""
    router = make_router(**SCORE_FUNCTIONS[name])
    shortcut = name in ("softmax_post", "softmax_scaled")
    assert router._selects_on_raw_logits == shortcut, name
    torch.manual_seed(0)
    for logits in (torch.randn(64, E), torch.randn(64, E).round(decimals=1)):  # also with ties
        assert torch.equal(router.predicted_topk(logits), router._megatron_topk(logits)), name
