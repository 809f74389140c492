"""The route input contract: per-layer ``[tokens, topk]`` integer expert ids in router token order.

A row of all ``-1`` means "use the live router for this token" (counted as a fallback). Anything
else that is not a valid set of ``topk`` distinct expert ids is a ``ValueError`` that names the
layer and the first bad token. Nothing is clamped, cast silently or repaired.
"""

from __future__ import annotations

import torch

FALLBACK = -1

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _where(layer: int, microbatch: int | None) -> str:
    return f"layer {layer}" + (f", microbatch {microbatch}" if microbatch is not None else "")


def validate_routes(
    routes: torch.Tensor,
    *,
    layer: int,
    num_experts: int,
    topk: int,
    num_tokens: int | None = None,
    microbatch: int | None = None,
) -> torch.Tensor:
    """Check one layer's routes and return them as an int64 tensor (a copy only if needed).

    Args:
        routes: ``[tokens, topk]`` integer tensor of global expert ids, or ``-1`` rows.
        layer: global layer number (1-based, megatron's ``layer_number``), for messages.
        num_experts: number of routed experts of the layer.
        topk: the router's top-k.
        num_tokens: expected token count, when known.
        microbatch: microbatch index, for messages.
    """
    where = _where(layer, microbatch)
    if not torch.is_tensor(routes):
        raise ValueError(
            f"routes for {where}: expected a torch.Tensor, got {type(routes).__name__}"
        )
    if routes.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"routes for {where}: expected an integer dtype, got {routes.dtype}")
    if routes.dim() != 2 or routes.shape[1] != topk:
        raise ValueError(
            f"routes for {where}: expected shape [tokens, topk={topk}], got {tuple(routes.shape)}"
        )
    if num_tokens is not None and routes.shape[0] != num_tokens:
        raise ValueError(
            f"routes for {where}: expected {num_tokens} tokens (rows), got {routes.shape[0]}"
        )
    if routes.dtype == torch.uint8 and num_experts > 255:
        raise ValueError(
            f"routes for {where}: uint8 cannot hold expert ids up to {num_experts - 1}"
        )
    routes = routes.to(torch.int64)
    if routes.numel() == 0:
        return routes

    fallback = routes == FALLBACK
    fallback_rows = fallback.all(dim=1)
    partial = fallback.any(dim=1) & ~fallback_rows
    if bool(partial.any()):
        token = int(partial.nonzero()[0, 0])
        raise ValueError(
            f"routes for {where}, token {token}: a row mixes -1 with expert ids "
            f"{routes[token].tolist()}; use all -1 for a live-router fallback"
        )
    bad_range = ((routes < 0) | (routes >= num_experts)) & ~fallback
    if bool(bad_range.any()):
        token = int(bad_range.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"routes for {where}, token {token}: expert id out of range [0, {num_experts}) "
            f"in {routes[token].tolist()}"
        )
    if topk > 1:
        ordered = routes.sort(dim=1).values
        duplicate = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1) & ~fallback_rows
        if bool(duplicate.any()):
            token = int(duplicate.nonzero()[0, 0])
            raise ValueError(
                f"routes for {where}, token {token}: duplicate expert id "
                f"in {routes[token].tolist()}"
            )
    return routes
