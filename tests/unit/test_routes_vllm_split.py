"""vLLM's split route layout (``--enable-return-routed-experts``): the request output's
``prompt_routed_experts`` ``[P, L, K]`` and each completion's ``routed_experts`` ``[G, L, K]``,
int16, read by ``parse_vllm`` directly; the older combined layout stays a second form."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_pr2.rl.rollout_routes import rollout_routes
from megatron_pr2.routes import payload as P
from megatron_pr2.routes.layout import RankCoords

# 4 layers, the first dense: vLLM reports every layer, the dense column is ignored.
SPEC = P.RouteSpec(num_layers=4, num_experts=16, topk=2, moe_layer_freq=[0, 1, 1, 1])


def vllm_rows(rows: int, seed: int) -> np.ndarray:
    """int16 ``[rows, 4 layers, top-2]`` of distinct ids per row, like vLLM's arrays."""
    g = np.random.default_rng(seed)
    return np.stack(
        [np.stack([g.permutation(16)[:2] for _ in range(4)]) for _ in range(rows)]
    ).astype(np.int16)


PROMPT = vllm_rows(5, 1)  # P = 5 prompt tokens
GENERATED = vllm_rows(3, 2)  # G = 3 generated tokens (the last one's row is the surplus row)


@pytest.mark.parametrize("generated_rows", [3, 2])  # with and without the surplus row
def test_split_layout_equals_the_combined_rows(generated_rows: int):
    tokens = 8
    split = P.parse_vllm(
        7,
        GENERATED[:generated_rows],
        num_tokens=tokens,
        spec=SPEC,
        prompt_routed_experts=PROMPT,
        prompt_tokens=5,
    )
    combined = np.concatenate([PROMPT, GENERATED[:generated_rows]])
    np.testing.assert_array_equal(split.routes[: tokens - 1], combined[: tokens - 1, 1:])
    old = P.parse_vllm(7, combined, num_tokens=tokens, spec=SPEC)
    np.testing.assert_array_equal(split.routes, old.routes)
    assert split.layers == (2, 3, 4) and split.routes.shape == (8, 3, 2)


def test_split_layout_accepts_torch_tensors():
    p = P.parse_vllm(
        0, torch.from_numpy(GENERATED), num_tokens=8, spec=SPEC,
        prompt_routed_experts=torch.from_numpy(PROMPT),
    )  # fmt: skip
    assert p.num_tokens == 8


@pytest.mark.parametrize(
    ("prompt", "generated", "kwargs", "message"),
    [
        (PROMPT[:4], GENERATED, {"prompt_tokens": 5}, "4 rows for a prompt of 5 tokens"),
        (PROMPT[:, :3], GENERATED, {}, r"\(5, 3, 2\) and routed_experts \(3, 4, 2\) do not stack"),
        (PROMPT[0], GENERATED, {}, "do not stack into"),
        (PROMPT, GENERATED[:1], {}, "expected 7 route rows"),
    ],
)
def test_split_layout_refusals_name_the_sample(prompt, generated, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        P.parse_vllm(4, generated, num_tokens=8, spec=SPEC, prompt_routed_experts=prompt, **kwargs)
    assert "sample 4" in str(info.value)


def test_engine_output_dispatch_reads_the_split_layout():
    output = SimpleNamespace(prompt_routed_experts=PROMPT, routed_experts=GENERATED)
    p = P.parse_engine_output(2, output, num_tokens=8, spec=SPEC)
    np.testing.assert_array_equal(p.routes[:7], np.concatenate([PROMPT, GENERATED])[:7, 1:])


def test_rollout_routes_take_vllm_routes_apart():
    """The rollout path hands vLLM's two arrays over unjoined (VllmRoutes)."""
    split = [P.VllmRoutes(PROMPT, GENERATED, 5), P.VllmRoutes(PROMPT[:2], GENERATED, 2)]
    joined = [np.concatenate([PROMPT, GENERATED]), np.concatenate([PROMPT[:2], GENERATED])]
    kwargs = dict(seq_length=8, micro_batch_size=2, spec=SPEC, coords=RankCoords())
    got = rollout_routes(split, [8, 5], layers=(2, 3, 4), source="vllm", **kwargs)
    want = rollout_routes(joined, [8, 5], layers=(2, 3, 4), source="vllm", **kwargs)
    for layer in (2, 3, 4):
        for a, b in zip(got[layer], want[layer]):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"sample 1 .*3 rows for a prompt of 2 tokens"):
        bad = [split[0], P.VllmRoutes(PROMPT[:3], GENERATED[:2], 2)]
        rollout_routes(bad, [8, 5], layers=(2, 3, 4), source="vllm", **kwargs)
