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

    Every fault kind is checked in one vectorised pass, so the token named is the first bad
    token whatever its fault, and a valid route costs one host sync.

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
    if routes.shape[0] == 0:  # a router always sees tokens: an empty route is a lost microbatch
        raise ValueError(
            f"routes for {where}: no rows, but a router always routes at least one token "
            "(use None for a microbatch that routes live)"
        )
    if routes.dtype == torch.uint8 and num_experts > 255:
        raise ValueError(
            f"routes for {where}: uint8 cannot hold expert ids up to {num_experts - 1}"
        )
    routes = routes.to(torch.int64)
    fallback = routes == FALLBACK
    any_fallback = fallback.any(dim=1)
    bad = (any_fallback & ~fallback.all(dim=1)) | (
        (routes < FALLBACK) | (routes >= num_experts)
    ).any(dim=1)
    if topk > 1:
        ordered = routes.sort(dim=1).values
        bad |= (ordered[:, 1:] == ordered[:, :-1]).any(dim=1) & ~any_fallback
    if bool(bad.any()):
        token = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"routes for {where}, token {token}: {_row_faults(routes[token].tolist(), num_experts)}"
        )
    return routes


def _row_faults(row: list[int], num_experts: int) -> str:
    """Every fault of one bad row, for the error message (slow path: one row, plain Python)."""
    faults = []
    if any(e != FALLBACK and not 0 <= e < num_experts for e in row):
        faults.append(f"expert id out of range [0, {num_experts}) in {row}")
    if FALLBACK in row and any(e != FALLBACK for e in row):
        faults.append(
            f"a row mixes -1 with expert ids {row}; use all -1 for a live-router fallback"
        )
    ids = [e for e in row if e != FALLBACK]
    if FALLBACK not in row and len(set(ids)) != len(ids):
        faults.append(f"duplicate expert id in {row}")
    return "; ".join(faults)
