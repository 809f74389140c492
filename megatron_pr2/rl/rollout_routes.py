"""Per-sample engine routes -> the ``{layer: [routes per micro-batch]}`` the trainer replays.

Every generation backend (the megatron KV engine, vLLM) reports one route row per token it
forwarded, ``[num_tokens - 1 (or num_tokens), layers, topk]`` per sample. Going through the
same validated :class:`~megatron_pr2.routes.payload.RoutePayload` path for all of them means
the last token and padding get the same synthetic legal rows, and the trainer's layout (SP
slice, this rank's layers) is derived in one place, whichever engine produced the routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_pr2.rl.engine import rollout_layouts
from megatron_pr2.routes.layout import RankCoords, batch_routes
from megatron_pr2.routes.payload import (
    RoutePayload,
    RouteSpec,
    VllmRoutes,
    parse_routes,
    parse_vllm,
)

__all__ = ["rollout_routes"]


def rollout_routes(
    per_sample: Sequence[Any],
    lengths: Sequence[int],
    *,
    seq_length: int,
    micro_batch_size: int,
    spec: RouteSpec,
    coords: RankCoords,
    layers: Sequence[int],
    source: str,
) -> dict[int, list[torch.Tensor]]:
    """``per_sample[i]``: sample ``i``'s routes ``[rows, layers, topk]`` (``rows`` =
    ``lengths[i] - 1`` or ``lengths[i]``), or for ``vllm`` a :class:`VllmRoutes` (prompt and
    completion rows apart, as vLLM returns them). ``layers``: the global MoE layer numbers of this
    rank's routers. ``source``: ``vllm`` routes are parsed as vLLM's ``routed_experts`` (full
    row checks, untrusted input); any other name marks routes this process recorded itself."""
    if len(per_sample) != len(lengths):
        raise ValueError(f"routes for {len(per_sample)} samples, but {len(lengths)} lengths")
    payloads: list[RoutePayload] = []
    for i, (rows, n) in enumerate(zip(per_sample, lengths)):
        if source == "vllm" and isinstance(rows, VllmRoutes):  # vLLM's split layout
            payloads.append(
                parse_vllm(
                    i,
                    rows.generated,
                    num_tokens=int(n),
                    spec=spec,
                    prompt_routed_experts=rows.prompt,
                    prompt_tokens=rows.prompt_tokens,
                )
            )
        elif source == "vllm":
            payloads.append(parse_vllm(i, rows, num_tokens=int(n), spec=spec))
        else:  # our own routers' top-k: distinct by construction, only range-checked
            payloads.append(
                parse_routes(i, rows, num_tokens=int(n), spec=spec, source=source, check_rows=False)
            )
    layouts = rollout_layouts([int(n) for n in lengths], seq_length, micro_batch_size)
    return batch_routes(payloads, layouts, coords, layers)
