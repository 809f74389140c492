"""Route codec: exact round trips in the narrowest signed dtype, and a named ValueError for every
malformed frame."""

from __future__ import annotations

import base64
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pr2.routes import codec


@st.composite
def route_arrays(draw):
    """[tokens, layers, topk] ids in [-1, num_experts) with whole -1 rows, in various dtypes."""
    num_experts = draw(st.integers(1, 300))
    topk = draw(st.integers(1, min(num_experts, 8)))
    tokens = draw(st.integers(0, 12))
    layers = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_experts, size=(tokens, layers, topk))
    fallback = rng.random((tokens, layers)) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    ids[fallback] = -1
    dtype = draw(st.sampled_from([np.int16, np.int32, np.int64]))
    return ids.astype(dtype), num_experts


@settings(max_examples=150, deadline=None)
@given(route_arrays(), st.booleans(), st.booleans())
def test_round_trip_is_exact_in_the_narrowest_dtype(case, checksum, as_torch):
    ids, num_experts = case
    source = torch.from_numpy(ids) if as_torch else ids
    frame = codec.encode(source, num_experts=num_experts, checksum=checksum)
    dtype = codec.narrowest_dtype(num_experts - 1)
    assert len(frame) == codec.header_bytes(3) + ids.size * dtype.itemsize
    out = codec.decode(bytes(frame), num_experts=num_experts, shape=(None, ids.shape[1], None))
    assert out.dtype == dtype and out.shape == ids.shape
    np.testing.assert_array_equal(out, ids)
    text = codec.encode_text(source, num_experts=num_experts, checksum=checksum)
    np.testing.assert_array_equal(codec.decode_text(text, num_experts=num_experts), ids)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 300))
def test_round_trip_any_rank(shape, num_experts):
    ids = np.random.default_rng(0).integers(-1, num_experts, size=shape)
    np.testing.assert_array_equal(codec.decode(codec.encode(ids, num_experts=num_experts)), ids)


@pytest.mark.parametrize(
    "max_id, dtype",
    [(0, "int8"), (127, "int8"), (128, "int16"), (255, "int16"), (32767, "int16"),
     (32768, "int32"), (2**31 - 1, "int32")],
)  # fmt: skip
def test_narrowest_dtype_holds_max_id_and_minus_one(max_id, dtype):
    chosen = codec.narrowest_dtype(max_id)
    assert chosen.name == dtype and chosen.kind == "i"  # signed: uint8 cannot hold -1
    assert np.iinfo(chosen).max >= max_id and np.iinfo(chosen).min <= -1


def test_dtype_follows_num_experts_not_the_ids_present():
    ids = np.zeros((2, 1, 2), dtype=np.int64)
    ids[:, :, 1] = 1
    assert codec.decode(codec.encode(ids, num_experts=300)).dtype == np.int16
    assert codec.decode(codec.encode(ids)).dtype == np.int8  # derived: max id + 1 = 2


def test_qwen3_shape_is_at_least_4x_smaller_than_int32_base64():
    ids = np.random.default_rng(1).integers(0, 128, size=(64, 48, 8), dtype=np.int16)
    frame = codec.encode(ids, num_experts=128)
    int32_b64 = base64.b64encode(ids.astype("<i4").tobytes())
    assert len(int32_b64) / len(frame) >= 5.0
    assert len(int32_b64) / len(codec.encode_text(ids, num_experts=128)) >= 3.9


def test_decoded_view_of_bytes_is_read_only():
    out = codec.decode(bytes(codec.encode(np.zeros((1, 1, 1), dtype=np.int64), num_experts=4)))
    assert not out.flags.writeable


# ------------------------------------------------------------------------------- bad frames
def frame_of(ids=None, num_experts=8, checksum=True) -> bytearray:
    ids = np.array([[[0, 1], [2, 3]], [[-1, -1], [7, 6]]]) if ids is None else ids
    return bytearray(codec.encode(ids, num_experts=num_experts, checksum=checksum))


def patched(offset: int, fmt: str, value, **kw) -> bytearray:
    buf = frame_of(**kw)
    struct.pack_into(fmt, buf, offset, value)
    return buf


def with_payload_byte(index: int, value: int, checksum: bool) -> bytearray:
    buf = frame_of(checksum=checksum)
    buf[codec.header_bytes(3) + index] = value & 0xFF
    if checksum:
        struct.pack_into("<I", buf, 12, zlib.crc32(buf[codec.header_bytes(3) :]))
    return buf


@pytest.mark.parametrize(
    "buf, kw, message",
    [
        (b"PR2", {}, r"sample 3: truncated frame: 3 bytes, the header alone needs 16"),
        (patched(0, "4s", b"PK\x03\x04"), {}, r"sample 3: bad magic b'PK\\x03\\x04', expected b'PR2R'"),
        (pickle.dumps(np.zeros(3)), {}, r"bad magic"),
        (patched(4, "B", 2), {}, r"unsupported frame version 2, this reader knows 1"),
        (patched(5, "B", 9), {}, r"unknown dtype code 9, expected one of \[1, 2, 3\]"),
        (patched(6, "B", 0), {}, r"bad ndim 0, expected 1 to 8"),
        (patched(6, "B", 9), {}, r"bad ndim 9, expected 1 to 8"),
        (patched(7, "B", 0x81), {}, r"unknown flag bits 0x80"),
        (patched(8, "<I", 0), {}, r"frame declares num_experts=0, must be >= 1"),
        (patched(8, "<I", 300), {}, r"dtype int8 cannot hold expert ids up to 299"),
        (frame_of(), {"num_experts": 16}, r"frame is for num_experts=8, expected 16"),
        (bytes(frame_of())[:30], {}, r"truncated frame: 30 bytes, the header with 3 dims needs 40"),
        (frame_of(), {"shape": (2, 2, 3)}, r"expected shape \(2, 2, 3\), got \(2, 2, 2\)"),
        (bytes(frame_of())[:-1], {}, r"truncated frame: payload has 7 bytes, shape \(2, 2, 2\) of int8 needs 8"),
        (bytes(frame_of()) + b"\0", {}, r"1 trailing bytes after the payload of shape \(2, 2, 2\)"),
        (patched(16, "<Q", 2**60), {}, r"truncated frame: payload has 8 bytes, shape \(1152921504606846976, 2, 2\)"),
        (patched(12, "<I", 12345), {}, r"checksum mismatch \(header CRC-32 0x00003039"),
        (patched(12, "<I", 5, checksum=False), {}, r"CRC-32 field is 0x00000005 but the CRC flag is clear"),
        (with_payload_byte(3, 8, True), {}, r"expert id 8 at index \(0, 1, 1\) out of range \[-1, 8\)"),
        (with_payload_byte(5, -2, False), {}, r"expert id -2 at index \(1, 0, 1\) out of range \[-1, 8\)"),
        ("not bytes", {}, r"expected a bytes-like frame, got str"),
    ],
)  # fmt: skip
def test_bad_frames_raise_naming_the_problem(buf, kw, message):
    with pytest.raises(ValueError, match=message):
        codec.decode(buf, what="sample 3", **kw)


def test_corrupted_payload_is_caught_by_the_checksum():
    buf = frame_of()
    buf[-1] ^= 0x01  # still a valid id, so only the CRC can tell
    with pytest.raises(ValueError, match="checksum mismatch"):
        codec.decode(buf)


@pytest.mark.parametrize(
    "text, message",
    [
        ("@@@@", r"sample 1: bad base64 envelope"),
        (base64.b64encode(bytes(frame_of())).decode()[:-4], r"sample 1: (bad base64|truncated)"),
        ("UFIyUg==\n", r"sample 1: bad base64 envelope"),
    ],
)
def test_bad_text_envelopes(text, message):
    with pytest.raises(ValueError, match=message):
        codec.decode_text(text, what="sample 1")


@pytest.mark.parametrize(
    "ids, kw, message",
    [
        (np.zeros((1, 2), dtype=np.float32), {}, r"expected integer expert ids, got dtype float32"),
        (torch.zeros(1, 2), {}, r"expected integer expert ids, got torch.float32"),
        (torch.zeros(1, 2, dtype=torch.bool), {}, r"expected integer expert ids, got torch.bool"),
        (np.array(3), {}, r"expected 1 to 8 dimensions, got 0"),
        (np.array([[0, 8]]), {"num_experts": 8}, r"expert id 8 at index \(0, 1\) out of range \[-1, 8\)"),
        (np.array([[0, -2]]), {"num_experts": 8}, r"expert id -2 at index \(0, 1\) out of range"),
        (np.array([[0, 1]]), {"num_experts": 0}, r"num_experts must be in \[1, 2147483648\], got 0"),
    ],
)  # fmt: skip
def test_encode_refuses_what_it_cannot_represent(ids, kw, message):
    with pytest.raises(ValueError, match=message):
        codec.encode(ids, **kw)


def test_narrowest_dtype_refuses_negative_and_huge_ids():
    with pytest.raises(ValueError, match="max expert id must be >= 0, got -1"):
        codec.narrowest_dtype(-1)
    with pytest.raises(ValueError, match="does not fit int32"):
        codec.narrowest_dtype(2**31)
