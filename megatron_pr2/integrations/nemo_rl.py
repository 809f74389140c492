"""What NeMo-RL's router replay does per microbatch, as one call on our routers.

NeMo-RL (R3) receives vLLM's ``routed_experts`` (``[tokens, layers, topk]``, all ``-1`` rows
where a route is missing), slices it for sequence parallelism, then walks the model's routers
and hands each its layer's column through megatron's native ``set_target_indices`` before
arming ``REPLAY_FORWARD``. Our routers serve that API (``patch.native``): routes are checked
when set, all ``-1`` rows route live, and a recompute replays its forward's route whatever
action is set by then. This module does the same walk so a NeMo-RL user calls one function::

    set_targets_from_routed_experts(model_chunks, routed_experts)  # before the forward
    output = model(...)
    ...
    clear_router_replay(model_chunks)  # after the pass (or on error)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_pr2.replay.session import config_moe_layers


def sequence_parallel_slice(routes: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's contiguous token slice, as megatron's sequence-parallel scatter splits
    the router's tokens (the token count must divide ``tp_size``)."""
    if routes.shape[0] % tp_size:
        raise ValueError(
            f"{routes.shape[0]} route rows do not divide over {tp_size} tensor-parallel ranks"
        )
    per_rank = routes.shape[0] // tp_size
    return routes[tp_rank * per_rank : (tp_rank + 1) * per_rank]


def layer_column(layer_number: int, num_columns: int, config: Any) -> int:
    """The column of ``routed_experts`` that holds 1-based ``layer_number``: vLLM returns one
    column per MoE layer; a full-transformer layout has one per decoder layer."""
    num_layers = int(config.num_layers)
    moe_layers = sorted(config_moe_layers(config))
    if num_columns == len(moe_layers):
        return moe_layers.index(layer_number)
    if num_columns == num_layers:
        return layer_number - 1
    raise ValueError(
        f"routed_experts has {num_columns} layer columns; expected {len(moe_layers)} (one per "
        f"MoE layer) or {num_layers} (one per decoder layer)"
    )


def replay_routers(model_chunks: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """Routers of the live model chunks with a megatron ``RouterReplay``, by layer number (a
    model walk, never megatron's global list, which also holds routers of temporary models)."""
    found = [
        module
        for chunk in model_chunks
        for module in chunk.modules()
        if isinstance(getattr(module, "router_replay", None), RouterReplay)
    ]
    return sorted(found, key=lambda router: router.layer_number)


def set_targets_from_routed_experts(
    model_chunks: Sequence[torch.nn.Module],
    routed_experts: torch.Tensor | np.ndarray,
    sequence_parallel: bool | None = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    action: RouterReplayAction = RouterReplayAction.REPLAY_FORWARD,
) -> list[int]:
    """Give every local router its layer's routes for the next forward and arm ``action``.

    ``routed_experts``: ``[tokens, layers, topk]`` in the router's token order (after packing
    and context-parallel sharding, before the sequence-parallel split), any integer dtype;
    rows of all ``-1`` route live. ``sequence_parallel`` defaults to the routers' config, the
    TP coordinates to megatron's ``parallel_state``. Returns the layer numbers that were set.
    """
    routes = torch.as_tensor(routed_experts)
    if routes.dim() != 3:
        raise ValueError(
            f"routed_experts must be [tokens, layers, topk], got {tuple(routes.shape)}"
        )
    routers = replay_routers(model_chunks)
    if not routers:
        raise ValueError("no router with a megatron RouterReplay in the model chunks")
    config = routers[0].config
    if sequence_parallel is None:
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    if sequence_parallel:
        if tp_rank is None or tp_size is None:
            from megatron.core import parallel_state

            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        routes = sequence_parallel_slice(routes, tp_rank, tp_size)
    for router in routers:
        column = layer_column(router.layer_number, routes.shape[1], config)
        router.router_replay.set_target_indices(routes[:, column].contiguous())
        router.router_replay.set_router_replay_action(action)
    return [router.layer_number for router in routers]


def clear_router_replay(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Back to live routing with no routes held, as NeMo-RL clears at schedule boundaries and
    on errors (so nothing leaks into the next pass)."""
    for router in replay_routers(model_chunks):
        router.router_replay.clear_router_replay_action()
        router.router_replay.clear_indices()
