"""Engine route formats -> RoutePayload: row/layer/topk contract, last-token fill, -1 fallback
rows, and a ValueError naming sample / layer / expected vs got for every violation."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pr2.routes import payload as P
from megatron_pr2.routes.fill import spread_routes

# DeepSeek-style: one leading dense layer, then MoE (layer numbers 2..4).
SPEC = P.RouteSpec(num_layers=4, num_experts=16, topk=2, moe_layer_freq=[0, 1, 1, 1])


def random_rows(rows: int, layers: int, topk: int, num_experts: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.stack([rng.permutation(num_experts)[:topk] for _ in range(rows * layers)]).reshape(
        rows, layers, topk
    )
    return out.astype(np.int16)


def assert_legal_row(row: np.ndarray, num_experts: int) -> None:
    assert len(set(row.tolist())) == len(row), row  # distinct
    assert row.min() >= 0 and row.max() < num_experts, row
    assert len(row) == 1 or row.any(), row  # never all zero


# ------------------------------------------------------------------------------- spec
@pytest.mark.parametrize(
    "freq, expected",
    [
        (1, (1, 2, 3, 4)),
        (2, (1, 3)),
        (3, (1, 4)),
        ([0, 1, 1, 1], (2, 3, 4)),
        ([1, 0, 0, 1], (1, 4)),
    ],
)
def test_moe_layers_follow_megatron_moe_layer_freq(freq, expected):
    assert (
        P.RouteSpec(num_layers=4, num_experts=8, topk=2, moe_layer_freq=freq).moe_layers == expected
    )


def test_spec_from_config_excludes_mtp():
    config = SimpleNamespace(
        num_layers=6, num_moe_experts=300, moe_router_topk=8, moe_layer_freq=2, mtp_num_layers=1
    )
    spec = P.RouteSpec.from_config(config)
    assert spec.moe_layers == (1, 3, 5) and spec.mtp_num_layers == 1
    assert spec.dtype == np.int16


def test_spec_from_real_transformer_config():
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_layer_freq=[0, 1, 0, 1],
        use_cpu_initialization=True,
    )
    assert P.RouteSpec.from_config(config).moe_layers == (2, 4)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"moe_layer_freq": [1, 0]}, r"moe_layer_freq list must hold 4 entries of 0/1, got \[1, 0\]"),
        ({"moe_layer_freq": [1, 2, 0, 0]}, r"moe_layer_freq list must hold 4 entries of 0/1"),
        ({"moe_layer_freq": [0, 0, 0, 0]}, r"leaves no MoE layer"),
        ({"moe_layer_freq": 0}, r"moe_layer_freq must be >= 1, got 0"),
        ({"moe_layer_freq": "[1,1,1,1]"}, r"moe_layer_freq must be an int or a 0/1 list"),
        ({"topk": 17}, r"need 1 <= topk <= num_experts, got topk=17, num_experts=16"),
        ({"num_layers": 0, "moe_layer_freq": 1}, r"num_layers must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_specs(kw, message):
    args = dict(num_layers=4, num_experts=16, topk=2, moe_layer_freq=1) | kw
    with pytest.raises(ValueError, match=message):
        P.RouteSpec(**args)


# ------------------------------------------------------------------------------- vLLM / mcore
@pytest.mark.parametrize("surplus", [0, 1])
@pytest.mark.parametrize("all_layers", [True, False])
def test_vllm_rows_map_to_moe_layers_and_fill_the_last_token(surplus, all_layers):
    tokens = 9
    layers = SPEC.num_layers if all_layers else len(SPEC.moe_layers)
    rows = random_rows(tokens - 1 + surplus, layers, SPEC.topk, SPEC.num_experts)
    if all_layers:
        rows[:, 0] = 0  # dense layer column: garbage that must be ignored (duplicate zeros)
    p = P.parse_vllm(5, rows, num_tokens=tokens, spec=SPEC)
    assert p.sample_id == 5 and p.layers == (2, 3, 4) and p.routes.dtype == np.int8
    assert p.routes.shape == (tokens, 3, 2) and p.num_tokens == tokens and p.topk == 2
    moe = rows[:, 1:] if all_layers else rows
    np.testing.assert_array_equal(p.routes[: tokens - 1], moe[: tokens - 1])
    expected_last = spread_routes(torch.tensor([tokens - 1]), SPEC.moe_layers, 2, 16)[0].numpy()
    np.testing.assert_array_equal(p.routes[-1], expected_last)  # surplus row is replaced
    for row in p.routes[-1]:
        assert_legal_row(row, SPEC.num_experts)
    np.testing.assert_array_equal(p.layer(3), p.routes[:, 1])


def test_minus_one_rows_are_kept_as_live_fallback():
    rows = random_rows(4, 3, 2, 16)
    rows[1, 2] = -1
    rows[3] = -1
    p = P.parse_mcore(0, rows, num_tokens=5, spec=SPEC)
    assert (p.routes[1, 2] == -1).all() and (p.routes[3] == -1).all()
    assert p.fallback_rows() == 4
    assert (p.routes[4] >= 0).all()  # the synthetic last row is a real route


def test_single_token_sample_has_only_the_synthetic_row():
    p = P.parse_vllm(0, np.zeros((0, 4, 2), dtype=np.int16), num_tokens=1, spec=SPEC)
    assert p.routes.shape == (1, 3, 2)


def test_fallback_payload_routes_every_token_live():
    p = P.RoutePayload.fallback(7, 3, SPEC)
    assert p.routes.shape == (3, 3, 2) and (p.routes == -1).all() and p.layers == (2, 3, 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_spread_routes_are_distinct_valid_and_spread(num_experts, data):
    topk = data.draw(st.integers(1, min(num_experts, 8)))
    salt = torch.arange(data.draw(st.integers(1, 40)))
    rows = spread_routes(salt, [1, 5, 48], topk, num_experts)
    assert rows.min() >= 0 and rows.max() < num_experts
    ordered = rows.sort(dim=-1).values
    assert not (ordered[..., 1:] == ordered[..., :-1]).any()
    if salt.numel() > 1 and num_experts > 1:  # consecutive padding tokens do not repeat a row
        assert not torch.equal(rows[0], rows[1])


def test_spread_routes_refuses_topk_above_num_experts():
    with pytest.raises(
        ValueError, match=r"need 1 <= topk <= num_experts, got topk=9, num_experts=8"
    ):
        spread_routes(torch.arange(2), [1], 9, 8)


# ------------------------------------------------------------------------------- SGLang
def sglang_b64(rows: np.ndarray) -> str:
    return base64.b64encode(rows.astype("<i4").tobytes()).decode("ascii")


def test_sglang_base64_int32_all_layers_with_dense_minus_one():
    rows = random_rows(6, 4, 2, 16).astype(np.int32)
    rows[:, 0] = -1  # SGLang's placeholder for the dense layer
    p = P.parse_sglang(2, sglang_b64(rows), num_tokens=7, spec=SPEC)
    np.testing.assert_array_equal(p.routes[:6], rows[:, 1:])
    assert p.fallback_rows() == 0  # the dense -1 column is not a fallback: it is dropped


def test_sglang_through_meta_info_dispatch():
    rows = random_rows(6, 3, 2, 16)
    out = {"text": "...", "meta_info": {"routed_experts": sglang_b64(rows)}}
    p = P.parse_engine_output(1, out, num_tokens=7, spec=SPEC)
    np.testing.assert_array_equal(p.routes[:6], rows)


def test_engine_output_dispatch_vllm_and_mcore():
    rows = random_rows(6, 4, 2, 16)
    vllm = SimpleNamespace(routed_experts=rows)
    mcore = {"routing_indices": rows.astype(np.int64)}
    a = P.parse_engine_output(0, vllm, num_tokens=7, spec=SPEC)
    b = P.parse_engine_output(0, mcore, num_tokens=7, spec=SPEC)
    np.testing.assert_array_equal(a.routes, b.routes)
    with pytest.raises(ValueError, match=r"sample 4: no routes in engine output"):
        P.parse_engine_output(4, {"text": "x"}, num_tokens=7, spec=SPEC)


def test_sglang_ambiguous_shape_asks_for_reported_layers():
    spec = P.RouteSpec(num_layers=6, num_experts=8, topk=1, moe_layer_freq=[0, 0, 0, 1, 1, 1])
    rows = random_rows(1, 6, 1, 8)  # 6 ids for 2 tokens: 1 row x 6 layers, or 2 rows x 3 layers
    rows[:, :3] = -1  # dense layers as SGLang writes them: the 2 x 3 reading is an all -1 row
    with pytest.raises(
        ValueError, match=r"sample 0 \(sglang routed_experts\): 6 ids match several"
    ):
        P.parse_sglang(0, sglang_b64(rows), num_tokens=2, spec=spec)
    p = P.parse_sglang(0, sglang_b64(rows), num_tokens=2, spec=spec, reported_layers=6)
    np.testing.assert_array_equal(p.routes[:1], rows[:, 3:])


@pytest.mark.parametrize(
    "data, message",
    [
        ("@@", r"sample 2 \(sglang routed_experts\): bad base64"),
        (base64.b64encode(b"\0" * 6).decode(), r"sample 2 \(sglang routed_experts\): 6 bytes is not a whole number of int32 ids"),
        (sglang_b64(np.zeros((5, 4, 2))), r"sample 2 \(sglang routed_experts\): 40 ids do not form \[6 or 7 rows, 3 or 4 layers, topk 2\]"),
    ],
)  # fmt: skip
def test_bad_sglang_payloads(data, message):
    with pytest.raises(ValueError, match=message):
        P.parse_sglang(2, data, num_tokens=7, spec=SPEC)


# ------------------------------------------------------------------------------- frames
def test_payload_frame_round_trip_raw_and_text():
    p = P.parse_vllm(3, random_rows(8, 3, 2, 16), num_tokens=9, spec=SPEC)
    again = P.parse_frame(3, p.to_frame(), num_tokens=9, spec=SPEC)
    np.testing.assert_array_equal(again.routes, p.routes)
    text = base64.b64encode(bytes(p.to_frame())).decode()
    np.testing.assert_array_equal(P.parse_frame(3, text, num_tokens=9, spec=SPEC).routes, p.routes)
    with pytest.raises(ValueError, match=r"sample 3: frame is for num_experts=16, expected 32"):
        P.parse_frame(3, p.to_frame(), num_tokens=9, spec=P.RouteSpec(4, 32, 2, [0, 1, 1, 1]))


# ------------------------------------------------------------------------------- errors
def bad(rows: np.ndarray, **edit) -> np.ndarray:
    rows = rows.copy()
    for index, value in edit.get("at", {}).items():
        rows[index] = value
    return rows


GOOD = random_rows(6, 3, 2, 16, seed=3)


@pytest.mark.parametrize(
    "rows, tokens, message",
    [
        (GOOD, 8, r"sample 9 \(vllm routed_experts\): expected 7 route rows \(one per token but the last\) or 8 \(one surplus row\) for 8 tokens, got 6"),
        (GOOD, 5, r"sample 9 \(vllm routed_experts\): expected 4 route rows .* or 5 .* for 5 tokens, got 6"),
        (GOOD, 0, r"sample 9: expected at least 1 token, got 0"),
        (random_rows(6, 5, 2, 16), 7, r"sample 9 \(vllm routed_experts\): expected a layer axis of 4 \(all layers\) or 3 \(MoE layers only\), got 5"),
        (random_rows(6, 3, 3, 16), 7, r"sample 9 \(vllm routed_experts\): expected topk 2, got 3"),
        (GOOD[:, :, 0], 7, r"sample 9 \(vllm routed_experts\): expected \[tokens, layers, topk\], got shape \(6, 3\)"),
        (GOOD.astype(np.float32), 7, r"sample 9 \(vllm routed_experts\): expected integer expert ids"),
        (bad(GOOD, at={(4, 1, 0): 16}), 7, r"sample 9, layer 3, token 4 \(vllm routed_experts\): expert id 16 out of range \[-1, 16\)"),
        (bad(GOOD, at={(2, 2, 1): -3}), 7, r"sample 9, layer 4, token 2 .*: expert id -3 out of range"),
        (bad(GOOD, at={(1, 0, 1): -1}), 7, r"sample 9, layer 2, token 1 \(vllm routed_experts\): a row mixes -1 with expert ids"),
        (bad(GOOD, at={(5, 2, 0): 4, (5, 2, 1): 4}), 7, r"sample 9, layer 4, token 5 \(vllm routed_experts\): duplicate expert id in \[4, 4\]"),
    ],
)  # fmt: skip
def test_bad_rows_name_sample_layer_and_expected_vs_got(rows, tokens, message):
    with pytest.raises(ValueError, match=message):
        P.parse_vllm(9, rows, num_tokens=tokens, spec=SPEC)


def test_out_of_range_id_in_the_dropped_surplus_row_is_ignored_but_not_elsewhere():
    rows = random_rows(7, 3, 2, 16)
    rows[6] = 0  # a stale padded surplus row (zeros): dropped, never replayed
    p = P.parse_vllm(0, rows, num_tokens=7, spec=SPEC)
    for row in p.routes[6]:
        assert_legal_row(row, 16)


def test_dense_layer_garbage_is_not_checked_but_moe_layers_are():
    rows = random_rows(6, 4, 2, 16)
    rows[:, 0] = 99  # dense column: out of range, ignored
    P.parse_vllm(0, rows, num_tokens=7, spec=SPEC)
    rows[3, 1] = 99
    with pytest.raises(ValueError, match=r"sample 0, layer 2, token 3"):
        P.parse_vllm(0, rows, num_tokens=7, spec=SPEC)


def test_mtp_layers_in_the_axis_are_refused_with_a_hint():
    spec = P.RouteSpec(num_layers=4, num_experts=16, topk=2, moe_layer_freq=1, mtp_num_layers=1)
    with pytest.raises(ValueError, match=r"got 5; it looks like 1 MTP layer\(s\) are included"):
        P.parse_vllm(0, random_rows(6, 5, 2, 16), num_tokens=7, spec=spec)


def test_payload_layer_lookup_names_sample_and_layer():
    p = P.parse_vllm(4, GOOD, num_tokens=7, spec=SPEC)
    with pytest.raises(
        ValueError, match=r"sample 4, layer 1: no routes \(payload has layers \[2, 3, 4\]\)"
    ):
        p.layer(1)
