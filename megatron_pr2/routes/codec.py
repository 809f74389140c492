"""Compact, validated binary codec for route arrays (per sample ``[tokens, layers, topk]``).

Why: routes are large (Qwen3-30B-A3B: 48 layers x top-8 = 384 ids per token, about 6 MB per
16K-token sample in int8) and nested JSON lists or int32 base64 cost seconds and gigabytes per
hop. Ids are stored in the narrowest *signed* integer type that holds both the largest expert id
and the ``-1`` live-fallback sentinel (uint8 cannot hold -1): int8 while the largest id is <= 127
(up to 128 experts), int16 up to 32768 experts, int32 beyond. No pickle: the frame is plain bytes
that any language can read, and decoding checks every field before trusting it.

Wire format, version 1 (all integers little-endian)::

    offset  size      field
    0       4         magic b"PR2R"
    4       1         version, 1
    5       1         dtype code: 1 = int8, 2 = int16, 3 = int32 (signed, little-endian)
    6       1         ndim, 1..8 (3 for [tokens, layers, topk])
    7       1         flags: bit 0 = CRC-32 present; every other bit must be 0
    8       4         num_experts (uint32, >= 1): every id is in [-1, num_experts)
    12      4         CRC-32 (zlib / IEEE 802.3) of the payload bytes; 0 when bit 0 is clear
    16      8 * ndim  shape, one uint64 per dimension
    16+8*ndim         payload: prod(shape) * itemsize bytes, C order, no trailing bytes

Text envelope (for JSON / HTTP hops): standard base64 (RFC 4648 section 4, ``=`` padding, no line
breaks) of the whole frame; :func:`encode_text` / :func:`decode_text`.

The dtype is chosen from ``num_experts`` (not from the ids actually present) so every sample of a
model gets the same dtype. Decoding raises ``ValueError`` naming what is wrong (truncated buffer,
bad magic, unknown version / dtype / flags, checksum, id out of range, unexpected shape).
"""

from __future__ import annotations

import binascii
import struct
import zlib
from typing import Any

import numpy as np
import torch

MAGIC = b"PR2R"
VERSION = 1
FLAG_CRC32 = 0x01
MAX_NDIM = 8
_FIXED = struct.Struct("<4sBBBBII")  # magic, version, dtype code, ndim, flags, experts, crc
HEADER_FIXED_BYTES = _FIXED.size  # 16

_CODE_TO_DTYPE = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4")}
_DTYPE_TO_CODE = {dt.itemsize: code for code, dt in _CODE_TO_DTYPE.items()}
_MAX_EXPERTS = int(np.iinfo(np.int32).max) + 1


def narrowest_dtype(max_id: int) -> np.dtype:
    """Narrowest signed little-endian dtype holding ``max_id`` and the ``-1`` sentinel."""
    if max_id < 0:
        raise ValueError(f"max expert id must be >= 0, got {max_id}")
    for dtype in _CODE_TO_DTYPE.values():
        if max_id <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"max expert id {max_id} does not fit int32")


def header_bytes(ndim: int) -> int:
    """Size of the header (before the payload) of a frame with ``ndim`` dimensions."""
    return HEADER_FIXED_BYTES + 8 * ndim


def as_numpy(routes: Any, what: str = "routes") -> np.ndarray:
    """Integer ndarray view of a torch tensor / ndarray (no copy when possible); bools and floats
    are refused because a silent cast could turn garbage into valid-looking ids."""
    if torch.is_tensor(routes):
        if routes.is_floating_point() or routes.is_complex() or routes.dtype == torch.bool:
            raise ValueError(f"{what}: expected integer expert ids, got {routes.dtype}")
        routes = routes.detach().cpu().numpy()
    try:
        array = np.asarray(routes)
    except ValueError as error:  # ragged nested rows: numpy's message names no sample
        raise ValueError(
            f"{what}: expected a rectangular array of expert ids, got ragged rows ({error})"
        ) from error
    if array.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer expert ids, got dtype {array.dtype}")
    return array


def first_bad_id(array: np.ndarray, num_experts: int) -> tuple[tuple[int, ...], int] | None:
    """(index, value) of the first id outside [-1, num_experts), or None. Fast path: one or two
    vectorised reductions; the index is searched only when something is wrong."""
    if array.size == 0:
        return None
    info = np.iinfo(array.dtype)
    low_ok = info.min >= -1 or int(array.min()) >= -1
    high_ok = info.max < num_experts or int(array.max()) < num_experts
    if low_ok and high_ok:
        return None
    bad = (array < -1) | (array >= num_experts) if info.min < 0 else array >= num_experts
    flat = int(np.flatnonzero(bad)[0])
    index = tuple(int(i) for i in np.unravel_index(flat, array.shape))
    return index, int(array[index])


def encode(routes: Any, *, num_experts: int | None = None, checksum: bool = True) -> memoryview:
    """Encode an integer array (ids in ``[-1, num_experts)``) into one frame.

    ``num_experts`` fixes the dtype and the range check; without it the largest id + 1 is used.
    Returns a memoryview over one fresh buffer (``bytes(frame)`` if an immutable copy is needed;
    base64, sockets and files take the view as is).
    """
    array = as_numpy(routes)
    if not 1 <= array.ndim <= MAX_NDIM:
        raise ValueError(f"routes: expected 1 to {MAX_NDIM} dimensions, got {array.ndim}")
    if num_experts is None:
        num_experts = max(int(array.max()) + 1, 1) if array.size else 1
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise ValueError(f"routes: num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}")
    bad = first_bad_id(array, num_experts)
    if bad is not None:
        raise ValueError(
            f"routes: expert id {bad[1]} at index {bad[0]} out of range [-1, {num_experts})"
        )
    dtype = narrowest_dtype(num_experts - 1)
    start = header_bytes(array.ndim)
    frame = np.empty(start + array.size * dtype.itemsize, dtype=np.uint8)
    payload = frame[start:].view(dtype).reshape(array.shape)
    np.copyto(payload, array, casting="unsafe")  # range checked above, so nothing wraps
    crc = zlib.crc32(frame[start:]) if checksum else 0
    _FIXED.pack_into(
        frame,
        0,
        MAGIC,
        VERSION,
        _DTYPE_TO_CODE[dtype.itemsize],
        array.ndim,
        FLAG_CRC32 if checksum else 0,
        num_experts,
        crc,
    )
    struct.pack_into(f"<{array.ndim}Q", frame, HEADER_FIXED_BYTES, *array.shape)
    return frame.data


def decode(
    buffer: Any,
    *,
    num_experts: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    what: str = "routes",
) -> np.ndarray:
    """Decode and validate one frame; returns a native-endian signed int array.

    The result is a read-only view of ``buffer`` when that is immutable (``bytes``); copy it to
    modify. ``num_experts``: when given, the frame must declare exactly this many experts.
    ``shape``: expected shape, ``None`` entries match anything. ``what`` names the frame in
    messages (e.g. ``"sample 7"``).
    """
    try:
        view = memoryview(buffer).cast("B")
    except TypeError as error:
        raise ValueError(
            f"{what}: expected a bytes-like frame, got {type(buffer).__name__}"
        ) from error
    size = view.nbytes
    if size < HEADER_FIXED_BYTES:
        raise ValueError(
            f"{what}: truncated frame: {size} bytes, the header alone needs {HEADER_FIXED_BYTES}"
        )
    magic, version, code, ndim, flags, frame_experts, crc = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"{what}: bad magic {magic!r}, expected {MAGIC!r} (not a route frame)")
    if version != VERSION:
        raise ValueError(
            f"{what}: unsupported frame version {version}, this reader knows {VERSION}"
        )
    if code not in _CODE_TO_DTYPE:
        raise ValueError(
            f"{what}: unknown dtype code {code}, expected one of {sorted(_CODE_TO_DTYPE)}"
        )
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"{what}: bad ndim {ndim}, expected 1 to {MAX_NDIM}")
    if flags & ~FLAG_CRC32:
        raise ValueError(f"{what}: unknown flag bits {flags & ~FLAG_CRC32:#04x}")
    dtype = _CODE_TO_DTYPE[code]
    if frame_experts < 1:
        raise ValueError(f"{what}: frame declares num_experts={frame_experts}, must be >= 1")
    if frame_experts - 1 > np.iinfo(dtype).max:
        raise ValueError(
            f"{what}: dtype {dtype.name} cannot hold expert ids up to {frame_experts - 1}"
        )
    if num_experts is not None and frame_experts != num_experts:
        raise ValueError(
            f"{what}: frame is for num_experts={frame_experts}, expected {num_experts}"
        )
    start = header_bytes(ndim)
    if size < start:
        raise ValueError(
            f"{what}: truncated frame: {size} bytes, the header with {ndim} dims needs {start}"
        )
    dims = struct.unpack_from(f"<{ndim}Q", view, HEADER_FIXED_BYTES)
    if shape is not None and (
        len(shape) != ndim or any(e is not None and e != g for e, g in zip(shape, dims))
    ):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {dims}")
    expected = dtype.itemsize
    for dim in dims:  # Python ints: no overflow on hostile shapes
        expected *= dim
    # A zero dimension makes the payload empty whatever the other dimensions, but numpy still
    # refuses to shape an array whose other dimensions overflow: say so, naming the frame.
    nonzero = dtype.itemsize
    for dim in dims:
        nonzero *= max(dim, 1)
    if nonzero > np.iinfo(np.intp).max:
        raise ValueError(f"{what}: shape {dims} is too large for an array, even if empty")
    got = size - start
    if got < expected:
        raise ValueError(
            f"{what}: truncated frame: payload has {got} bytes, shape {dims} of {dtype.name} "
            f"needs {expected}"
        )
    if got > expected:
        raise ValueError(
            f"{what}: {got - expected} trailing bytes after the payload of shape {dims}"
        )
    payload = view[start:]
    if flags & FLAG_CRC32:
        actual = zlib.crc32(payload)
        if actual != crc:
            raise ValueError(
                f"{what}: checksum mismatch (header CRC-32 {crc:#010x}, payload {actual:#010x}): "
                "the payload was corrupted in transit"
            )
    elif crc != 0:
        raise ValueError(f"{what}: CRC-32 field is {crc:#010x} but the CRC flag is clear")
    try:
        array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    except ValueError as error:  # any other limit numpy enforces, with the frame named
        raise ValueError(f"{what}: cannot shape the payload as {dims}: {error}") from error
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    bad = first_bad_id(array, frame_experts)
    if bad is not None:
        raise ValueError(
            f"{what}: expert id {bad[1]} at index {bad[0]} out of range [-1, {frame_experts})"
        )
    return array


def encode_text(routes: Any, *, num_experts: int | None = None, checksum: bool = True) -> str:
    """The frame in the base64 text envelope (ASCII, no newlines)."""
    frame = encode(routes, num_experts=num_experts, checksum=checksum)
    return binascii.b2a_base64(frame, newline=False).decode("ascii")


def decode_text(
    text: str | bytes,
    *,
    num_experts: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    what: str = "routes",
) -> np.ndarray:
    """Decode a base64 text envelope (strict: no whitespace or foreign characters)."""
    try:
        frame = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise ValueError(f"{what}: bad base64 envelope: {error}") from error
    return decode(frame, num_experts=num_experts, shape=shape, what=what)
