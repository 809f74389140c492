"""Rollout-engine route payloads built in the engines' documented response formats (test-only)."""

from __future__ import annotations

import base64

import numpy as np
import torch

from megatron_pr2.routes.layout import MicrobatchLayout, RankCoords, batch_routes
from megatron_pr2.routes.payload import RoutePayload, RouteSpec, parse_sglang, parse_vllm


def engine_rows(sample_id: int, num_tokens: int, spec: RouteSpec) -> np.ndarray:
    """What an engine returns for one sample: ``[num_tokens - 1, moe layers, topk]`` distinct
    expert ids per row (the last token has no route), seeded by the sample id."""
    g = torch.Generator().manual_seed(1000 + sample_id)
    rows = torch.rand(num_tokens - 1, len(spec.moe_layers), spec.num_experts, generator=g)
    return rows.argsort(dim=-1)[..., : spec.topk].numpy()


def vllm_payload(sample_id: int, num_tokens: int, spec: RouteSpec) -> RoutePayload:
    rows = engine_rows(sample_id, num_tokens, spec).astype(np.int16)  # vLLM: int16 ndarray
    return parse_vllm(sample_id, rows, num_tokens=num_tokens, spec=spec)


def sglang_payload(sample_id: int, num_tokens: int, spec: RouteSpec) -> RoutePayload:
    rows = engine_rows(sample_id, num_tokens, spec).astype("<i4")  # SGLang: base64 int32 LE
    encoded = base64.b64encode(rows.tobytes()).decode("ascii")
    return parse_sglang(sample_id, encoded, num_tokens=num_tokens, spec=spec)


def microbatch_layouts(num_microbatches: int, micro_batch: int, seq: int) -> list[MicrobatchLayout]:
    return [
        MicrobatchLayout.bshd(
            [mb * micro_batch + i for i in range(micro_batch)], [seq] * micro_batch, seq
        )
        for mb in range(num_microbatches)
    ]


def session_routes(payloads, layouts, config, layers) -> dict[int, list[torch.Tensor]]:
    """Payloads -> this rank's ``{layer: [routes per microbatch]}`` (SP slice, PP layers)."""
    coords = RankCoords.from_megatron(sequence_parallel=config.sequence_parallel)
    return batch_routes(payloads, layouts, coords, layers)
