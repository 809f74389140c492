"""Issue 16 (routes): engine payloads, codec frames and batch assembly refuse what they cannot
read unambiguously, naming the sample (and layer / token), instead of dropping or keeping rows."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from megatron_pr2.routes import codec
from megatron_pr2.routes import layout as L
from megatron_pr2.routes import payload as P

SPEC = P.RouteSpec(num_layers=2, num_experts=8, topk=2, moe_layer_freq=1)
EVERY_OTHER = P.RouteSpec(num_layers=2, num_experts=8, topk=2, moe_layer_freq=2)  # MoE: layer 1


def _payload(sid: int, n: int, first: int = 0) -> P.RoutePayload:
    rows = np.tile(np.array([[first, 1], [2, 3]], dtype=np.int16), (n - 1, 1, 1))
    return P.parse_vllm(sid, rows, num_tokens=n, spec=SPEC)


def _sglang(rows: np.ndarray) -> str:
    return base64.b64encode(np.asarray(rows, dtype="<i4").tobytes()).decode("ascii")


# ------------------------------------------------------------------ batch assembly
def test_batch_routes_refuses_two_payloads_for_one_sample():
    layouts = [L.MicrobatchLayout.thd([1], [4]), L.MicrobatchLayout.thd([2], [3])]
    payloads = [_payload(1, 4), _payload(2, 3), _payload(1, 4, first=5)]
    with pytest.raises(ValueError, match=r"sample 1: two route payloads for one sample"):
        L.batch_routes(payloads, layouts, L.RankCoords(), [1, 2])


# ------------------------------------------------------------------ SGLang layer axis
def test_sglang_moe_only_rows_are_not_read_as_all_layers():
    moe_only = np.array([[[0, 1]], [[2, 3]]])  # 2 tokens, layer 1 only, surplus row included
    payload = P.parse_sglang(0, _sglang(moe_only), num_tokens=2, spec=EVERY_OTHER)
    np.testing.assert_array_equal(payload.routes[:1, 0], [[0, 1]])


def test_sglang_all_layers_reading_needs_minus_one_in_dense_columns():
    moe_only = np.array([[[0, 1]], [[2, 3]]])
    with pytest.raises(
        ValueError,
        match=r"sample 0 \(sglang routed_experts\): 4 ids read as 1 rows x 2 layers .*"
        r"dense layer \(layer 2, token 0: \[2, 3\]\).*reported_layers=2",
    ):  # before: read as one all-layers row, the second token's route silently dropped
        P.parse_sglang(0, _sglang(moe_only), num_tokens=2, spec=EVERY_OTHER, reported_layers=2)
    all_layers = np.array([[[4, 5], [-1, -1]]])
    payload = P.parse_sglang(
        0, _sglang(all_layers), num_tokens=2, spec=EVERY_OTHER, reported_layers=2
    )
    np.testing.assert_array_equal(payload.routes[:1, 0], [[4, 5]])


def test_sglang_all_layers_count_with_ids_in_a_dense_column_is_refused():
    rows = np.tile(np.array([[0, 1], [2, 3]]), (4, 1, 1))  # 5 tokens: only all-layers fits
    with pytest.raises(ValueError, match=r"sample 3 .*dense layer \(layer 2, token 0: \[2, 3\]\)"):
        P.parse_sglang(3, _sglang(rows), num_tokens=5, spec=EVERY_OTHER)


# ------------------------------------------------------------------ first bad token
@pytest.mark.parametrize(
    "second_row",
    [[[8, 1], [0, 1]], [[-1, 1], [0, 1]]],  # token 1: an id out of range, a partial -1 row
)
def test_payload_names_the_first_bad_token_over_every_kind_of_fault(second_row):
    rows = np.array([[[0, 1], [3, 3]], second_row], dtype=np.int16)  # token 0: a duplicate
    with pytest.raises(
        ValueError, match=r"sample 4, layer 2, token 0 \(vllm routed_experts\): duplicate"
    ):
        P.parse_vllm(4, rows, num_tokens=3, spec=SPEC)


def test_payload_first_bad_token_is_a_partial_row_before_an_out_of_range_id():
    rows = np.array([[[-1, 1], [0, 1]], [[0, 1], [9, 1]]], dtype=np.int16)
    with pytest.raises(ValueError, match=r"sample 4, layer 1, token 0 .*mixes -1"):
        P.parse_vllm(4, rows, num_tokens=3, spec=SPEC)


# ------------------------------------------------------------------ malformed inputs
def _frame(dims: tuple[int, ...]) -> bytes:
    header = bytearray(codec.encode(np.zeros((0, 2, 2), np.int8), num_experts=8, checksum=False))
    header[6] = len(dims)
    return bytes(header[: codec.HEADER_FIXED_BYTES]) + struct.pack(f"<{len(dims)}Q", *dims)


@pytest.mark.parametrize("dims", [(0, 2**63, 2), (0, 2**40, 2**40)])
def test_codec_frame_with_a_zero_dimension_names_the_sample(dims):
    with pytest.raises(ValueError, match=r"sample 5: shape .* is too large for an array"):
        P.parse_frame(5, _frame(dims), num_tokens=4, spec=SPEC)


@pytest.mark.parametrize(
    "ragged",
    [
        [[[0, 1], [2, 3]], [[0, 1]]],  # a token with one layer too few
        [[[0, 1], [2, 3]], [[0, 1], [2]]],  # a row with one id too few
        [np.zeros((2, 2), np.int16), np.zeros((1, 2), np.int16)],
    ],
)
def test_ragged_engine_output_names_the_sample(ragged):
    with pytest.raises(ValueError, match=r"sample 7 \(vllm routed_experts\): .*ragged rows"):
        P.parse_engine_output(7, {"routed_experts": ragged}, num_tokens=3, spec=SPEC)
    with pytest.raises(ValueError, match=r"sample 7 \(mcore routing_indices\): .*ragged rows"):
        P.parse_mcore(7, ragged, num_tokens=3, spec=SPEC)
