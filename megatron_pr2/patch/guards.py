"""Refuse megatron configurations in which routes would silently not be replayed."""

from __future__ import annotations

from typing import Any

from megatron_pr2.config import RouterReplayConfig

# Routing types whose top-k never reaches the replay hook.
_BYPASSING_ROUTING_TYPES = {
    "sinkhorn": "sinkhorn routing takes its own top-k and never calls the replay hook",
    "quantile_balancing": "quantile-balancing routing passes precomputed indices past the hook",
}


def _routing_types(config: Any) -> list[str]:
    kind = getattr(config, "moe_router_load_balancing_type", None)
    if kind is None:
        return []
    return list(kind) if isinstance(kind, (list, tuple)) else [kind]


def check_replay_compatible(config: Any, replay: RouterReplayConfig | None = None) -> None:
    """Raise ``ValueError`` naming the megatron option that would bypass or corrupt replay."""
    problems: list[str] = []
    if getattr(config, "moe_router_fusion", False):
        problems.append(
            "moe_router_fusion=True: the TE fused top-k returns before megatron's replay hook, "
            "so replayed routes would be ignored; set moe_router_fusion=False"
        )
    for kind in _routing_types(config):
        if kind in _BYPASSING_ROUTING_TYPES:
            problems.append(
                f"moe_router_load_balancing_type={kind!r}: {_BYPASSING_ROUTING_TYPES[kind]}"
            )
    if getattr(config, "moe_router_force_load_balancing", False):
        problems.append(
            "moe_router_force_load_balancing=True replaces router logits with random ones, so "
            "gate weights of replayed routes would not come from the router"
        )
    if getattr(config, "moe_router_force_biased", None) is not None:
        problems.append(
            "moe_router_force_biased adds a random bias to router logits (benchmark option); "
            "gate weights of replayed routes would not come from the router"
        )
    if getattr(config, "num_microbatches_with_partial_activation_checkpoints", None) is not None:
        problems.append(
            "num_microbatches_with_partial_activation_checkpoints recomputes only some "
            "microbatches; recompute-route matching is not validated for it"
        )
    allow_dropping = replay.allow_token_dropping if replay is not None else False
    if getattr(config, "moe_expert_capacity_factor", None) is not None and not allow_dropping:
        problems.append(
            "moe_expert_capacity_factor is set: token dropping runs after replay and may drop "
            "replayed (token, expert) pairs; unset it or set router_replay.allow_token_dropping"
        )
    if problems:
        raise ValueError("routing replay cannot be enabled:\n  - " + "\n  - ".join(problems))
