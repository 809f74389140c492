"""Routes in the exact vLLM and SGLang response formats go through parsing and alignment into a
replayed megatron-core forward, which routes every token exactly as the engine said."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.models.gpt import lm_forward_backward
from megatron_pr2.routes.payload import RouteSpec
from tests.support import engine_routes as er
from tests.support import replay_harness as h


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_routes_drive_the_replayed_forward(world1, engine):
    built = h.build("ours")
    config = built.chunks[0].config
    spec = RouteSpec.from_config(config)
    make = er.vllm_payload if engine == "vllm" else er.sglang_payload
    num_mb = 2
    payloads = [make(sid, h.SEQ, spec) for sid in range(num_mb * h.MICRO_BATCH)]
    layouts = er.microbatch_layouts(num_mb, h.MICRO_BATCH, h.SEQ)
    routes = er.session_routes(payloads, layouts, config, built.session.layers)

    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in built.session.layers}
    hooks = [
        built.session._routers[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: seen[layer].append(out[1].detach().clone())
        )
        for layer in built.session.layers
    ]
    try:
        with torch.no_grad(), built.session.replaying(routes):
            lm_forward_backward(built.chunks, h.make_batches(num_mb), forward_only=True)
    finally:
        for hook in hooks:
            hook.remove()

    by_id = {p.sample_id: p for p in payloads}
    for layer in built.session.layers:
        assert len(seen[layer]) == num_mb
        for mb, routing_map in enumerate(seen[layer]):
            # router token order: [s, b] flattened sequence-major
            for row in range(routing_map.shape[0]):
                position, b = divmod(row, h.MICRO_BATCH)
                sample = layouts[mb].sample_ids[b]
                expected = set(by_id[sample].layer(layer)[position].tolist())
                assert set(routing_map[row].nonzero().flatten().tolist()) == expected, (
                    f"layer {layer} mb {mb} row {row}"
                )
    assert built.session.metrics()["router_replay/fallback_tokens"] == 0


def test_payload_for_a_sample_not_in_the_batch_is_refused(world1):
    built = h.build("ours")
    config = built.chunks[0].config
    spec = RouteSpec.from_config(config)
    payloads = [er.vllm_payload(sid, h.SEQ, spec) for sid in (0, 1, 7)]
    with pytest.raises(ValueError, match=r"sample\(s\) \[7\]: not in any microbatch"):
        er.session_routes(payloads, er.microbatch_layouts(1, 2, h.SEQ), config, [1, 2, 3, 4])


def test_payload_with_wrong_token_count_names_sample_and_counts(world1):
    spec = RouteSpec.from_config(h.build("ours").chunks[0].config)
    rows = er.engine_rows(3, h.SEQ, spec)
    from megatron_pr2.routes.payload import parse_vllm

    with pytest.raises(ValueError, match="sample 3"):
        parse_vllm(3, rows[:-3], num_tokens=h.SEQ, spec=spec)
