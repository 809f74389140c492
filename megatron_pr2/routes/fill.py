"""Synthetic routes for tokens that have none (the last token of a sample, padding tokens).

Why not zeros or ``arange(topk)``: a row of zeros repeats expert 0 (duplicate ids collapse the
routing map and break the dispatcher's token counts), and the same row for every padding token
sends all padding to the same experts (an expert-parallel hot spot). Each synthetic row here holds
``topk`` *distinct* valid ids ``(base + j * stride) % num_experts`` for ``j < topk`` with
``stride = num_experts // topk``: the ids are spread evenly over the expert range (so over EP
ranks), and ``base`` moves with a per-token ``salt`` (its position) and the layer, so consecutive
padding tokens rotate through the experts. Deterministic: every pass and rank gets the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def spread_routes(
    salt: torch.Tensor, layers: Sequence[int], topk: int, num_experts: int
) -> torch.Tensor:
    """``[len(salt), len(layers), topk]`` int64 rows of distinct ids in ``[0, num_experts)``.

    ``salt``: one non-negative int per token (its position), ``layers``: global layer numbers.
    """
    if not 1 <= topk <= num_experts:
        raise ValueError(
            f"need 1 <= topk <= num_experts, got topk={topk}, num_experts={num_experts}"
        )
    stride = num_experts // topk
    salt = salt.to(torch.int64).reshape(-1, 1, 1)
    layer = torch.as_tensor(list(layers), dtype=torch.int64).reshape(1, -1, 1)
    slot = torch.arange(topk, dtype=torch.int64).reshape(1, 1, -1)
    # j * stride < num_experts for j < topk, so the topk ids of a row are distinct mod E.
    return (salt + 7 * layer + slot * stride) % num_experts
