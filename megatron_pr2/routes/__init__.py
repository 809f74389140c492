"""Routes from rollout engines to this rank's routers: compact codec, engine-format parsing,
and one alignment family (packing, CP zig-zag, SP slice, PP/VP layers, DP / micro-batches)."""

from megatron_pr2.routes.codec import decode, decode_text, encode, encode_text, narrowest_dtype
from megatron_pr2.routes.layout import (
    MicrobatchLayout,
    RankCoords,
    batch_routes,
    rank_moe_layers,
    rank_token_keys,
    rank_tokens,
    rank_valid_mask,
    routes_for_rank,
)
from megatron_pr2.routes.payload import (
    RoutePayload,
    RouteSpec,
    parse_engine_output,
    parse_frame,
    parse_mcore,
    parse_routes,
    parse_sglang,
    parse_vllm,
)

__all__ = [
    "MicrobatchLayout",
    "RankCoords",
    "RoutePayload",
    "RouteSpec",
    "batch_routes",
    "decode",
    "decode_text",
    "encode",
    "encode_text",
    "narrowest_dtype",
    "parse_engine_output",
    "parse_frame",
    "parse_mcore",
    "parse_routes",
    "parse_sglang",
    "parse_vllm",
    "rank_moe_layers",
    "rank_token_keys",
    "rank_tokens",
    "rank_valid_mask",
    "routes_for_rank",
]
