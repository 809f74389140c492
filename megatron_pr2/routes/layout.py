"""One alignment family for routes, predictor token keys and any other per-token tensor.

Why one family: replay is only correct if route row ``i`` on a rank belongs to exactly the token
the router sees in row ``i``. Every per-token quantity (routes, token keys, masks, input ids)
therefore goes through the same index map, built once per (microbatch, rank):

1. **Model input** (:class:`MicrobatchLayout`): samples side by side, ``[b, s]`` padded to a
   common ``s`` (BSHD), or packed into ``[1, t]`` with each sequence padded to a multiple
   (THD, ``cu_seqlens`` / ``cu_seqlens_padded``). A *slot* is a flat position in that tensor.
2. **Context parallel**: each sequence (a BSHD row, a THD sub-sequence) is split into
   ``2 * CP`` equal chunks; CP rank ``r`` keeps chunks ``r`` and ``2 * CP - 1 - r``, in that
   order, exactly like megatron's ``get_batch_on_this_cp_rank`` (BSHD) and TE's
   ``thd_get_partitioned_indices`` (THD, per sequence) split ``input_ids``.
3. **Router order**: the router sees ``[s, b]`` flattened sequence-major (row = pos * b + i).
4. **Sequence parallel**: TP rank ``r`` keeps rows ``[r * (s/TP) * b, (r + 1) * (s/TP) * b)``.

:func:`local_slots` returns the slots of this rank's router rows; everything else is a gather
through it. Padding slots have no token: routes get distinct valid experts spread over the
experts (:mod:`megatron_pr2.routes.fill`), token keys get unique negative values, and
:func:`rank_valid_mask` excludes them from metrics. Layer slicing (which global MoE layer numbers
live on a pipeline stage / virtual chunk) mirrors megatron's ``get_transformer_layer_offset`` and
``get_num_layers_to_build``; DP sharding and micro-batching are contiguous splits.

Routes leave :func:`routes_for_rank` in their narrow dtype (int8 for <= 128 experts): the replay
state's ``validate_routes`` widens them to int64, so moving them to the GPU first moves 8x fewer
bytes. Any inconsistency (a length that CP/TP does not divide, routes of a sample that is not in
the microbatch, a missing layer, a token-count mismatch) is a ``ValueError`` naming sample, layer
and expected vs got; nothing is silently realigned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from megatron_pr2.routes.fill import spread_routes
from megatron_pr2.routes.payload import RoutePayload, RouteSpec

T = TypeVar("T")
_MAX_SAMPLE_ID = (1 << 31) - 1  # token keys are sample << 32 | position in a signed int64


# ----------------------------------------------------------------------------- rank and batch
@dataclass(frozen=True)
class RankCoords:
    """This rank's place in the token-splitting parallel dimensions."""

    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    cp_size: int = 1
    cp_rank: int = 0

    def __post_init__(self) -> None:
        for name, size, rank in (
            ("tp", self.tp_size, self.tp_rank),
            ("cp", self.cp_size, self.cp_rank),
        ):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{name}: need size >= 1 and 0 <= rank < size, got {rank}/{size}")

    @property
    def sp_split(self) -> int:
        """How many ways the router's token axis is split by TP (1 without SP)."""
        return self.tp_size if self.sequence_parallel else 1

    @classmethod
    def from_megatron(cls, sequence_parallel: bool) -> RankCoords:
        """From megatron's initialised ``parallel_state``."""
        from megatron.core import parallel_state as ps

        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            sequence_parallel=sequence_parallel,
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
        )


@dataclass(frozen=True)
class MicrobatchLayout:
    """The model-input layout of one microbatch (which token sits in which slot)."""

    sample_ids: tuple[int, ...]
    lengths: tuple[int, ...]
    padded_lengths: tuple[int, ...]  # per sample: its span in the model input
    packed: bool  # THD ([1, t]) or BSHD ([b, s])

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if n == 0:
            raise ValueError("a microbatch needs at least one sample")
        if len(self.lengths) != n or len(self.padded_lengths) != n:
            raise ValueError(
                f"{n} sample ids but {len(self.lengths)} lengths / "
                f"{len(self.padded_lengths)} padded lengths"
            )
        if len(set(self.sample_ids)) != n:
            dup = sorted({s for s in self.sample_ids if self.sample_ids.count(s) > 1})
            raise ValueError(f"sample(s) {dup} appear more than once in the microbatch")
        for sid, length, padded in zip(self.sample_ids, self.lengths, self.padded_lengths):
            if not 0 <= sid <= _MAX_SAMPLE_ID:
                raise ValueError(f"sample {sid}: id must be in [0, {_MAX_SAMPLE_ID}]")
            if not 1 <= length <= padded:
                raise ValueError(
                    f"sample {sid}: expected 1 <= length <= padded length {padded}, got {length}"
                )

    # -------------------------------------------------------------- constructors
    @classmethod
    def thd(
        cls, sample_ids: Sequence[int], lengths: Sequence[int], pad_multiple: int = 1
    ) -> MicrobatchLayout:
        """Sequence packing: each sequence padded up to a multiple of ``pad_multiple`` (use the
        data pipeline's value, e.g. NeMo-RL's ``make_sequence_length_divisible_by``)."""
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        padded = tuple(-(-int(n) // pad_multiple) * pad_multiple for n in lengths)
        return cls(tuple(int(s) for s in sample_ids), tuple(int(n) for n in lengths), padded, True)

    @classmethod
    def from_cu_seqlens(
        cls, sample_ids: Sequence[int], cu_seqlens: Any, cu_seqlens_padded: Any
    ) -> MicrobatchLayout:
        """THD layout from the packed batch's own ``cu_seqlens`` / ``cu_seqlens_padded`` (any
        per-sequence padding policy, e.g. fp8 alignment)."""
        bounds = np.asarray(cu_seqlens, dtype=np.int64).reshape(-1)
        padded = np.asarray(cu_seqlens_padded, dtype=np.int64).reshape(-1)
        if bounds.size != len(sample_ids) + 1 or padded.size != len(sample_ids) + 1:
            raise ValueError(
                f"{len(sample_ids)} samples need cu_seqlens of {len(sample_ids) + 1} entries, got "
                f"{bounds.size} / {padded.size} (padded)"
            )
        return cls(
            tuple(int(s) for s in sample_ids),
            tuple(int(n) for n in np.diff(bounds)),
            tuple(int(n) for n in np.diff(padded)),
            True,
        )

    @classmethod
    def bshd(
        cls,
        sample_ids: Sequence[int],
        lengths: Sequence[int],
        seq_length: int | None = None,
        pad_multiple: int = 1,
    ) -> MicrobatchLayout:
        """``[b, s]`` batch; ``s`` = ``seq_length``, or the longest sample rounded up to a
        multiple of ``pad_multiple``."""
        lengths = tuple(int(n) for n in lengths)
        if seq_length is None:
            longest = max(lengths, default=1)
            seq_length = -(-longest // max(pad_multiple, 1)) * max(pad_multiple, 1)
        for sid, n in zip(sample_ids, lengths):
            if n > seq_length:
                raise ValueError(f"sample {sid}: length {n} exceeds seq_length {seq_length}")
        ids = tuple(int(s) for s in sample_ids)
        return cls(ids, lengths, (int(seq_length),) * len(ids), False)

    # -------------------------------------------------------------- derived
    @property
    def batch_size(self) -> int:
        return 1 if self.packed else len(self.sample_ids)

    @property
    def seq_length(self) -> int:
        return sum(self.padded_lengths) if self.packed else self.padded_lengths[0]

    @property
    def num_slots(self) -> int:
        return self.batch_size * self.seq_length

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[n + 1]`` cumulative lengths (megatron's ``PackedSeqParams.cu_seqlens_q``)."""
        return torch.from_numpy(_cumsum0(self.lengths).astype(np.int32))

    @property
    def cu_seqlens_padded(self) -> torch.Tensor:
        """int32 ``[n + 1]`` cumulative padded lengths (``cu_seqlens_q_padded``)."""
        return torch.from_numpy(_cumsum0(self.padded_lengths).astype(np.int32))

    def slot_to_stream(self) -> torch.Tensor:
        """``[num_slots]``: the stream index held by each slot, ``-1`` for padding."""
        return torch.from_numpy(_slot_to_stream(self))


# Index maps are built with numpy: they are small integer arithmetic on a few arrays, where
# numpy has no per-op dispatch cost; tensors are made once at the end.
def _cumsum0(values: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=out[1:])
    return out


def _slot_to_stream(layout: MicrobatchLayout) -> np.ndarray:
    lengths = np.asarray(layout.lengths, dtype=np.int64)
    sample = np.repeat(np.arange(len(lengths)), lengths)
    stream = np.arange(layout.num_tokens, dtype=np.int64)
    position = stream - _cumsum0(layout.lengths)[:-1][sample]
    out = np.full(layout.num_slots, -1, dtype=np.int64)
    out[_cumsum0(layout.padded_lengths)[:-1][sample] + position] = stream
    return out


def check_layout(layout: MicrobatchLayout, coords: RankCoords) -> None:
    """Raise unless CP and SP split this microbatch exactly (as megatron requires)."""
    cp, tp = coords.cp_size, coords.sp_split
    if cp > 1:
        for sid, padded in zip(layout.sample_ids, layout.padded_lengths):
            if padded % (2 * cp):
                what = "padded length" if layout.packed else "seq_length"
                raise ValueError(
                    f"sample {sid}: {what} {padded} is not divisible by 2*CP = {2 * cp}; pad "
                    f"every sequence to a multiple of {2 * cp} (times TP with sequence parallel)"
                )
    local = layout.seq_length // cp
    if tp > 1 and local % tp:
        raise ValueError(
            f"microbatch of samples {list(layout.sample_ids)}: per-CP-rank sequence length "
            f"{local} is not divisible by TP = {tp} (sequence parallel)"
        )


# ----------------------------------------------------------------------------- the index map
def _cp_zigzag_slots(layout: MicrobatchLayout, cp_size: int, cp_rank: int) -> np.ndarray:
    b = layout.batch_size
    if cp_size == 1:
        return np.arange(layout.num_slots, dtype=np.int64).reshape(b, -1)
    chunk = np.asarray(layout.padded_lengths, dtype=np.int64) // (2 * cp_size)
    seq = np.repeat(np.arange(len(chunk)), 2 * chunk)  # sequence of each local slot
    j = np.arange(seq.size, dtype=np.int64) - _cumsum0(2 * chunk)[:-1][seq]  # index within it
    c = chunk[seq]
    first = j < c
    which = np.where(first, cp_rank, 2 * cp_size - 1 - cp_rank)
    slots = _cumsum0(layout.padded_lengths)[:-1][seq] + which * c + np.where(first, j, j - c)
    return slots.reshape(b, -1)


def cp_zigzag_slots(layout: MicrobatchLayout, cp_size: int, cp_rank: int) -> torch.Tensor:
    """``[b, s / CP]`` slots kept by CP rank ``cp_rank``: per sequence, chunks ``r`` and
    ``2*CP-1-r`` of ``2*CP`` (megatron's split of ``input_ids``)."""
    return torch.from_numpy(_cp_zigzag_slots(layout, cp_size, cp_rank))


def _local_slots(layout: MicrobatchLayout, coords: RankCoords) -> np.ndarray:
    check_layout(layout, coords)
    slots = _cp_zigzag_slots(layout, coords.cp_size, coords.cp_rank)  # [b, s_local]
    rows = slots.T.reshape(-1)  # router order: sequence-major from [s, b]
    if coords.sp_split > 1:
        per_rank = rows.size // coords.sp_split
        rows = rows[coords.tp_rank * per_rank : (coords.tp_rank + 1) * per_rank]
    return rows


def local_slots(layout: MicrobatchLayout, coords: RankCoords) -> torch.Tensor:
    """Model-input slot of each router row on this rank (CP split, [s, b] order, SP slice)."""
    return torch.from_numpy(np.ascontiguousarray(_local_slots(layout, coords)))


def rank_stream_index(layout: MicrobatchLayout, coords: RankCoords) -> torch.Tensor:
    """Stream index (samples' tokens concatenated) of each router row; ``-1`` = padding."""
    return torch.from_numpy(_slot_to_stream(layout)[_local_slots(layout, coords)])


def rank_valid_mask(layout: MicrobatchLayout, coords: RankCoords) -> torch.Tensor:
    """True for router rows that hold a real token (False = padding: keep out of metrics)."""
    return torch.from_numpy(_slot_to_stream(layout)[_local_slots(layout, coords)] >= 0)


def rank_token_keys(layout: MicrobatchLayout, coords: RankCoords) -> torch.Tensor:
    """Predictor token keys (``sample << 32 | position``, see ``predictor.cache.token_keys``)
    of each router row; padding rows get unique negative keys ``-(1 + slot)``."""
    slots = _local_slots(layout, coords)
    stream = _slot_to_stream(layout)[slots]
    ids = np.asarray(layout.sample_ids, dtype=np.int64)
    offsets = _cumsum0(layout.lengths)[:-1]
    clamped = np.maximum(stream, 0)
    sample = np.searchsorted(offsets, clamped, side="right") - 1
    keys = (ids[sample] << 32) | (clamped - offsets[sample])
    return torch.from_numpy(np.where(stream >= 0, keys, -(slots + 1)))


def pack_model_input(
    per_sample: Sequence[torch.Tensor], layout: MicrobatchLayout, pad_value: Any = 0
) -> torch.Tensor:
    """``[b, s, ...]`` model input from per-sample ``[length, ...]`` tensors (``[1, t, ...]``
    when packed), padding filled with ``pad_value``."""
    stream = _concat_samples(per_sample, layout)
    out = torch.full((layout.num_slots, *stream.shape[1:]), pad_value, dtype=stream.dtype)
    index = layout.slot_to_stream()
    valid = index >= 0
    out[valid] = stream[index[valid]]
    return out.view(layout.batch_size, layout.seq_length, *stream.shape[1:])


def rank_view(
    model_input: torch.Tensor, layout: MicrobatchLayout, coords: RankCoords
) -> torch.Tensor:
    """This rank's router rows of a tensor already in the model-input layout ``[b, s, ...]``."""
    if tuple(model_input.shape[:2]) != (layout.batch_size, layout.seq_length):
        raise ValueError(
            f"model input: expected leading shape {(layout.batch_size, layout.seq_length)}, "
            f"got {tuple(model_input.shape[:2])}"
        )
    return model_input.reshape(layout.num_slots, *model_input.shape[2:])[
        local_slots(layout, coords)
    ]


def rank_tokens(
    per_sample: Sequence[torch.Tensor],
    layout: MicrobatchLayout,
    coords: RankCoords,
    pad_value: Any = 0,
) -> torch.Tensor:
    """This rank's router rows of per-sample ``[length, ...]`` tensors; padding = ``pad_value``."""
    stream = _concat_samples(per_sample, layout)
    index = rank_stream_index(layout, coords)
    out = stream[index.clamp(min=0)]
    out[index < 0] = pad_value
    return out


def assemble(
    parts: Mapping[tuple[int, int], torch.Tensor],
    layout: MicrobatchLayout,
    *,
    cp_size: int = 1,
    tp_size: int = 1,
    sequence_parallel: bool = False,
) -> list[torch.Tensor]:
    """Inverse of :func:`rank_tokens`: per-sample tensors from every rank's rows, keyed by
    ``(cp_rank, tp_rank)``. Raises if a token is missing or two ranks disagree on it."""
    stream: torch.Tensor | None = None
    seen = torch.zeros(layout.num_tokens, dtype=torch.bool)
    for cp_rank in range(cp_size):
        for tp_rank in range(tp_size):
            coords = RankCoords(tp_size, tp_rank, sequence_parallel, cp_size, cp_rank)
            if (cp_rank, tp_rank) not in parts:
                raise ValueError(f"assemble: no rows from rank (cp {cp_rank}, tp {tp_rank})")
            part = parts[(cp_rank, tp_rank)]
            index = rank_stream_index(layout, coords)
            if part.shape[0] != index.numel():
                raise ValueError(
                    f"assemble: rank (cp {cp_rank}, tp {tp_rank}): expected {index.numel()} rows, "
                    f"got {part.shape[0]}"
                )
            if stream is None:
                stream = torch.empty((layout.num_tokens, *part.shape[1:]), dtype=part.dtype)
            valid = index >= 0
            rows, src = index[valid], part[valid]
            again = seen[rows]
            if bool(again.any()) and not torch.equal(stream[rows[again]], src[again]):
                raise ValueError(
                    f"assemble: rank (cp {cp_rank}, tp {tp_rank}) disagrees with an earlier rank"
                )
            stream[rows] = src
            seen[rows] = True
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0, 0])
        sample = int(np.searchsorted(_cumsum0(layout.lengths)[:-1], missing, side="right")) - 1
        raise ValueError(f"assemble: sample {layout.sample_ids[sample]} has tokens no rank holds")
    assert stream is not None
    return list(stream.split(list(layout.lengths)))


def _concat_samples(per_sample: Sequence[torch.Tensor], layout: MicrobatchLayout) -> torch.Tensor:
    if len(per_sample) != len(layout.sample_ids):
        raise ValueError(
            f"expected tensors for {len(layout.sample_ids)} samples {list(layout.sample_ids)}, "
            f"got {len(per_sample)}"
        )
    for sid, length, tensor in zip(layout.sample_ids, layout.lengths, per_sample):
        if tensor.dim() == 0 or tensor.shape[0] != length:
            raise ValueError(
                f"sample {sid}: expected {length} tokens, got shape {tuple(tensor.shape)}"
            )
    return torch.cat(list(per_sample))


# ----------------------------------------------------------------------------- routes
def routes_for_rank(
    payloads: Iterable[RoutePayload],
    layout: MicrobatchLayout,
    coords: RankCoords,
    layers: Sequence[int],
    *,
    fallback_spec: RouteSpec | None = None,
) -> dict[int, torch.Tensor]:
    """This rank's ``{layer_number: [router rows, topk]}`` routes for one microbatch.

    ``payloads``: one per sample of ``layout`` (any order). ``layers``: the global MoE layer
    numbers of this rank's routers (:func:`rank_moe_layers`). Samples without a payload are an
    error unless ``fallback_spec`` is given, which makes them route live (all ``-1``). Padding
    rows get distinct valid experts spread over the experts (salt = slot).
    """
    layers = [int(layer) for layer in layers]
    if not layers:
        return {}
    by_id: dict[int, RoutePayload] = {}
    for payload in payloads:
        sid = payload.sample_id
        if sid in by_id:
            raise ValueError(f"sample {sid}: two route payloads for one sample")
        if sid not in layout.sample_ids:
            raise ValueError(
                f"routes for sample {sid}: sample not in this microbatch "
                f"(samples {list(layout.sample_ids)})"
            )
        by_id[sid] = payload
    ordered: list[RoutePayload] = []
    for sid, length in zip(layout.sample_ids, layout.lengths):
        payload = by_id.get(sid)
        if payload is None:
            if fallback_spec is None:
                raise ValueError(
                    f"sample {sid}: no routes for a sample of this microbatch (pass "
                    "fallback_spec to route it live)"
                )
            payload = RoutePayload.fallback(sid, length, fallback_spec)
        if payload.num_tokens != length:
            raise ValueError(
                f"sample {sid}: routes cover {payload.num_tokens} tokens, expected {length} "
                "(the sample's tokens in the batch)"
            )
        ordered.append(payload)
    ref = ordered[0]
    for payload in ordered[1:]:
        if (payload.topk, payload.num_experts, payload.routes.dtype) != (
            ref.topk,
            ref.num_experts,
            ref.routes.dtype,
        ):
            raise ValueError(
                f"sample {payload.sample_id}: topk {payload.topk} / num_experts "
                f"{payload.num_experts} / dtype {payload.routes.dtype}, expected {ref.topk} / "
                f"{ref.num_experts} / {ref.routes.dtype} (as sample {ref.sample_id})"
            )

    slots = _local_slots(layout, coords)
    index = _slot_to_stream(layout)[slots]
    stream = _route_stream(ordered, layers, layout.num_tokens)  # [tokens, layers] of topk-ids
    out = np.empty((len(layers), index.size), dtype=stream.dtype)
    clamped = np.maximum(index, 0)
    # Gather + transpose in cache-sized blocks of rows (several times faster than one big
    # strided transpose); each element is one token's whole [topk] row.
    for start in range(0, index.size, _BLOCK):
        out[:, start : start + _BLOCK] = stream.take(clamped[start : start + _BLOCK], axis=0).T
    routes = out.view(ref.routes.dtype).reshape(len(layers), index.size, ref.topk)
    pad = index < 0
    if pad.any():
        filler = spread_routes(torch.from_numpy(slots[pad]), layers, ref.topk, ref.num_experts)
        routes[:, pad] = filler.numpy().astype(routes.dtype).transpose(1, 0, 2)
    per_layer = torch.from_numpy(routes)
    return {layer: per_layer[i] for i, layer in enumerate(layers)}


_BLOCK = 256


def _route_stream(
    ordered: Sequence[RoutePayload], layers: Sequence[int], num_tokens: int
) -> np.ndarray:
    """``[tokens, layers]`` array whose elements are whole ``[topk]`` rows (a void view), the
    samples' tokens concatenated; no copy for one sample whose layers are all wanted."""
    ref = ordered[0]
    element = np.dtype((np.void, ref.topk * ref.routes.itemsize))
    columns = [_columns(payload, layers) for payload in ordered]
    if len(ordered) == 1 and columns[0] == slice(0, len(ref.layers)):
        routes = np.ascontiguousarray(ref.routes)
        return routes.view(element).reshape(routes.shape[:2])
    stream = np.empty((num_tokens, len(layers), ref.topk), dtype=ref.routes.dtype)
    offset = 0
    for payload, column in zip(ordered, columns):
        block = stream[offset : offset + payload.num_tokens]
        if isinstance(column, slice):
            np.copyto(block, payload.routes[:, column])
        else:
            np.take(payload.routes, column, axis=1, out=block)
        offset += payload.num_tokens
    return stream.view(element).reshape(num_tokens, len(layers))


def _columns(payload: RoutePayload, layers: Sequence[int]) -> slice | list[int]:
    """Columns of ``layers`` in the payload (a slice when contiguous, to copy without a gather)."""
    columns = []
    for layer in layers:
        try:
            columns.append(payload.layers.index(layer))
        except ValueError:
            raise ValueError(
                f"sample {payload.sample_id}, layer {layer}: no routes for this layer "
                f"(payload has layers {list(payload.layers)})"
            ) from None
    first = columns[0]
    if columns == list(range(first, first + len(columns))):
        return slice(first, first + len(columns))
    return columns


def stack_microbatches(
    microbatches: Sequence[Mapping[int, torch.Tensor]],
) -> dict[int, list[torch.Tensor]]:
    """``[{layer: routes}, ...]`` per microbatch -> the session's ``{layer: [mb0, mb1, ...]}``."""
    if not microbatches:
        return {}
    layers = sorted(microbatches[0])
    for i, routes in enumerate(microbatches):
        if sorted(routes) != layers:
            raise ValueError(
                f"microbatch {i}: routes for layers {sorted(routes)}, expected {layers} "
                "(as microbatch 0)"
            )
    return {layer: [routes[layer] for routes in microbatches] for layer in layers}


def batch_routes(
    payloads: Iterable[RoutePayload],
    layouts: Sequence[MicrobatchLayout],
    coords: RankCoords,
    layers: Sequence[int],
    *,
    fallback_spec: RouteSpec | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Session routes for a whole local batch: payloads are matched to microbatches by sample.
    Two payloads for one sample are refused (keeping either would silently drop the other)."""
    by_id: dict[int, RoutePayload] = {}
    for payload in payloads:
        if payload.sample_id in by_id:
            raise ValueError(f"sample {payload.sample_id}: two route payloads for one sample")
        by_id[payload.sample_id] = payload
    known = {sid for layout in layouts for sid in layout.sample_ids}
    stray = sorted(set(by_id) - known)
    if stray:
        raise ValueError(f"routes for sample(s) {stray}: not in any microbatch of this rank")
    return stack_microbatches(
        [
            routes_for_rank(
                [by_id[s] for s in layout.sample_ids if s in by_id],
                layout,
                coords,
                layers,
                fallback_spec=fallback_spec,
            )
            for layout in layouts
        ]
    )


# ----------------------------------------------------------------------------- DP / microbatches
def dp_shard(items: Sequence[T], dp_size: int, dp_rank: int) -> list[T]:
    """Contiguous shard ``dp_rank`` of ``dp_size`` (the global batch must divide evenly)."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp: need size >= 1 and 0 <= rank < size, got {dp_rank}/{dp_size}")
    if len(items) % dp_size:
        raise ValueError(f"{len(items)} samples do not split evenly over DP = {dp_size}")
    per = len(items) // dp_size
    return list(items[dp_rank * per : (dp_rank + 1) * per])


def split_microbatches(items: Sequence[T], micro_batch_size: int) -> list[list[T]]:
    """Contiguous microbatches of ``micro_batch_size`` samples (must divide evenly)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if len(items) % micro_batch_size:
        raise ValueError(
            f"{len(items)} samples do not split into microbatches of {micro_batch_size}"
        )
    return [list(items[i : i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]


# ----------------------------------------------------------------------------- layers per stage
def stage_layer_numbers(
    num_layers: int,
    *,
    pp_size: int = 1,
    pp_rank: int = 0,
    vp_size: int | None = None,
    vp_stage: int | None = None,
    num_layers_in_first_pipeline_stage: int | None = None,
    num_layers_in_last_pipeline_stage: int | None = None,
    account_for_embedding_in_pipeline_split: bool = False,
    account_for_loss_in_pipeline_split: bool = False,
) -> range:
    """Global 1-based decoder layer numbers built on pipeline rank ``pp_rank``, virtual chunk
    ``vp_stage``: megatron's layer counts per (stage, chunk), offsets in chunk-major order
    (the same numbers as ``get_transformer_layer_offset`` / ``get_num_layers_to_build``)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp: need 0 <= rank < size, got {pp_rank}/{pp_size}")
    if pp_size == 1:
        return range(1, num_layers + 1)
    vp = vp_size or 1
    stage = vp_stage or 0
    if not 0 <= stage < vp:
        raise ValueError(f"vp: need 0 <= vp_stage < vp_size, got {vp_stage}/{vp_size}")
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    emb, loss = account_for_embedding_in_pipeline_split, account_for_loss_in_pipeline_split

    def count(p: int, v: int) -> int:
        if first is not None or last is not None:
            if emb or loss:
                raise ValueError("uneven pipeline stages cannot account for embedding / loss")
            middle_stages = pp_size - (first is not None) - (last is not None)
            rest = num_layers - (first or 0) - (last or 0)
            if middle_stages > 0 and rest % middle_stages:
                raise ValueError(
                    f"{rest} middle layers do not split over {middle_stages} middle stages"
                )
            n = rest // middle_stages if middle_stages > 0 else 0
            if p == 0 and first is not None:
                n = first
            if p == pp_size - 1 and last is not None:
                n = last
        else:
            total = num_layers + emb + loss
            if total % pp_size:
                raise ValueError(f"{total} layers do not split over PP = {pp_size}")
            n = total // pp_size
        if n % vp:
            raise ValueError(f"{n} layers of pipeline stage {p} do not split over VP = {vp}")
        n //= vp
        n -= int(emb and p == 0 and v == 0)
        n -= int(loss and p == pp_size - 1 and v == vp - 1)
        return n

    offset = sum(count(p, v) for v in range(stage) for p in range(pp_size))
    offset += sum(count(p, stage) for p in range(pp_rank))
    return range(offset + 1, offset + count(pp_rank, stage) + 1)


def megatron_stage_layer_numbers(config: Any, pp_rank: int, vp_stage: int | None = None) -> range:
    """The same, from megatron-core's own functions on a ``TransformerConfig`` (also covers
    ``pipeline_model_parallel_layout``, which reads the PP rank from ``parallel_state``)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(offset + 1, offset + count + 1)


def rank_moe_layers(
    spec: RouteSpec,
    *,
    pp_size: int = 1,
    pp_rank: int = 0,
    vp_size: int | None = None,
    **stage_kwargs: Any,
) -> list[int]:
    """Global MoE layer numbers of every router on this pipeline rank (all virtual chunks);
    MTP layers are never included (their routers stay live)."""
    stages = range(vp_size) if vp_size and pp_size > 1 else [None]
    local: set[int] = set()
    for stage in stages:
        local.update(
            stage_layer_numbers(
                spec.num_layers,
                pp_size=pp_size,
                pp_rank=pp_rank,
                vp_size=vp_size,
                vp_stage=stage,
                **stage_kwargs,
            )
        )
    return [layer for layer in spec.moe_layers if layer in local]
