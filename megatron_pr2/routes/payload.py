"""Rollout-engine route outputs -> one validated :class:`RoutePayload` per sample.

A sample is its prompt + response tokens (``num_tokens`` of them). Engines report one route row
per token they *forwarded*; the last sampled token is never forwarded, so the expected row count
is ``num_tokens - 1``:

* vLLM: ``routed_experts``, an int16 array ``[num_tokens - 1 (or num_tokens), layers, topk]``;
* SGLang: ``meta_info["routed_experts"]``, base64 of little-endian int32, flattened from
  ``[num_tokens - 1, layers, topk]`` (positions ``[0, len - 1)``); dense layers hold ``-1``;
* megatron-core inference (0.19+): ``routing_indices``, an ndarray ``[total_tokens - 1, layers,
  topk]``;
* this package's codec frame (:mod:`megatron_pr2.routes.codec`), raw or base64.

Rules (NeMo-RL's R3 contract, made explicit):

* Rows: ``num_tokens - 1`` or ``num_tokens`` (one surplus row) are accepted, anything else is a
  ``ValueError``. The last token's route is always synthetic: a surplus row is dropped (no engine
  forwards the final token, so that row is stale or padding) and replaced by distinct valid ids
  spread over the experts (:func:`megatron_pr2.routes.fill.spread_routes`, salt = its position).
  The last token predicts nothing, so its route never reaches the loss; it only has to be legal.
* Layers: the layer axis must be either every decoder layer (``num_layers``; dense-layer columns
  are ignored, except that SGLang's flat output, which carries no shape, is read as all layers
  only where they hold ``-1``) or the MoE layers only, in layer order. Columns are mapped to megatron's global,
  1-based ``layer_number`` through ``moe_layer_freq`` (int N: layer i, 0-based, is MoE iff
  ``i % N == 0``; or a 0/1 list), as megatron's layer specs do. MTP layers are never part of the
  mapping (MTP routers share decoder layer numbers and must stay live), so an axis that includes
  them is refused.
* Rows of all ``-1`` are kept: they are live-router fallbacks, counted by the replay metrics.
  Partial ``-1`` rows, duplicate ids in a row, and ids outside ``[-1, num_experts)`` are errors.
* Every error names the sample (and the layer / token when there is one) and expected vs got;
  the token named is the first bad one over every kind of fault.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch

from megatron_pr2.routes import codec
from megatron_pr2.routes.fill import spread_routes


@dataclass(frozen=True)
class RouteSpec:
    """The model facts route parsing needs (the same fields as megatron's TransformerConfig)."""

    num_layers: int
    num_experts: int
    topk: int
    moe_layer_freq: int | Sequence[int] = 1
    mtp_num_layers: int = 0
    moe_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(
                f"need 1 <= topk <= num_experts, got topk={self.topk}, "
                f"num_experts={self.num_experts}"
            )
        freq = self.moe_layer_freq
        if isinstance(freq, bool) or not isinstance(freq, (int, Sequence)) or isinstance(freq, str):
            raise ValueError(f"moe_layer_freq must be an int or a 0/1 list, got {freq!r}")
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"moe_layer_freq must be >= 1, got {freq}")
            pattern = [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        else:
            pattern = list(freq)
            if len(pattern) != self.num_layers or any(p not in (0, 1) for p in pattern):
                raise ValueError(
                    f"moe_layer_freq list must hold {self.num_layers} entries of 0/1, got {pattern}"
                )
            object.__setattr__(self, "moe_layer_freq", tuple(pattern))
        moe = tuple(i + 1 for i, p in enumerate(pattern) if p)
        if not moe:
            raise ValueError(f"moe_layer_freq {freq!r} leaves no MoE layer")
        object.__setattr__(self, "moe_layers", moe)

    @classmethod
    def from_config(cls, config: Any) -> RouteSpec:
        """From a megatron ``TransformerConfig`` (or anything with the same attributes)."""
        return cls(
            num_layers=int(config.num_layers),
            num_experts=int(config.num_moe_experts),
            topk=int(config.moe_router_topk),
            moe_layer_freq=config.moe_layer_freq,
            mtp_num_layers=int(getattr(config, "mtp_num_layers", None) or 0),
        )

    @property
    def dtype(self) -> np.dtype:
        """The narrow dtype routes of this model travel in."""
        return codec.narrowest_dtype(self.num_experts - 1)


@dataclass(frozen=True)
class RoutePayload:
    """Validated routes of one sample, one row per token (the last row is synthetic).

    ``routes``: ``[num_tokens, len(layers), topk]`` in the spec's narrow signed dtype;
    ``layers``: global 1-based layer numbers of axis 1 (the model's MoE layers).
    """

    sample_id: int
    routes: np.ndarray
    layers: tuple[int, ...]
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return int(self.routes.shape[0])

    @property
    def topk(self) -> int:
        return int(self.routes.shape[2])

    def layer(self, layer_number: int) -> np.ndarray:
        """``[num_tokens, topk]`` routes of one global layer."""
        try:
            column = self.layers.index(layer_number)
        except ValueError:
            raise ValueError(
                f"sample {self.sample_id}, layer {layer_number}: no routes "
                f"(payload has layers {list(self.layers)})"
            ) from None
        return self.routes[:, column]

    def fallback_rows(self) -> int:
        """Token routes (token x layer) that fall back to the live router."""
        return int((self.routes[..., 0] == -1).sum())

    def to_frame(self, checksum: bool = True) -> memoryview:
        """This payload as one codec frame (see :mod:`megatron_pr2.routes.codec`)."""
        return codec.encode(self.routes, num_experts=self.num_experts, checksum=checksum)

    @classmethod
    def fallback(cls, sample_id: int, num_tokens: int, spec: RouteSpec) -> RoutePayload:
        """A sample without captured routes: every token routes live (all ``-1``)."""
        routes = np.full((num_tokens, len(spec.moe_layers), spec.topk), -1, dtype=spec.dtype)
        return cls(sample_id, routes, spec.moe_layers, spec.num_experts)


# ---------------------------------------------------------------------------------- parsing
def parse_routes(
    sample_id: int,
    rows: Any,
    *,
    num_tokens: int,
    spec: RouteSpec,
    source: str = "routes",
    check_rows: bool = True,
) -> RoutePayload:
    """Validate ``rows`` ``[num_tokens - 1 or num_tokens, layers, topk]`` into a payload.

    ``check_rows``: also reject partial ``-1`` rows and duplicate ids (pairwise compares of the
    ``topk`` slots, ~2 ns per id; turn off only for data validated upstream). Ids out of range
    are always rejected.
    """
    where = f"sample {sample_id}"
    array = codec.as_numpy(rows, what=f"{where} ({source})")
    if array.ndim != 3:
        raise ValueError(
            f"{where} ({source}): expected [tokens, layers, topk], got shape {array.shape}"
        )
    got_rows, got_layers, got_topk = array.shape
    if got_topk != spec.topk:
        raise ValueError(f"{where} ({source}): expected topk {spec.topk}, got {got_topk}")
    columns = _layer_columns(where, source, got_layers, spec)
    if num_tokens < 1:
        raise ValueError(f"{where}: expected at least 1 token, got {num_tokens}")
    if got_rows not in (num_tokens - 1, num_tokens):
        raise ValueError(
            f"{where} ({source}): expected {num_tokens - 1} route rows (one per token but the "
            f"last) or {num_tokens} (one surplus row) for {num_tokens} tokens, got {got_rows}"
        )
    kept = array[: num_tokens - 1]
    if columns is not None:
        kept = kept[:, columns]
    _check_range(where, source, kept, spec, check_rows)
    routes = np.empty((num_tokens, len(spec.moe_layers), spec.topk), dtype=spec.dtype)
    np.copyto(routes[: num_tokens - 1], kept, casting="unsafe")  # range checked: no wrap
    if check_rows:  # on the narrow copy: fewer bytes to scan
        _check_rows(where, source, routes[: num_tokens - 1], spec)
    last = spread_routes(
        torch.tensor([num_tokens - 1]), spec.moe_layers, spec.topk, spec.num_experts
    )
    routes[num_tokens - 1] = last[0].numpy()
    return RoutePayload(sample_id, routes, spec.moe_layers, spec.num_experts)


class VllmRoutes(NamedTuple):
    """One sample's routes in vLLM's split layout, as :func:`parse_vllm` reads them:
    ``prompt`` (the request output's ``prompt_routed_experts``), ``generated`` (the
    completion's ``routed_experts``) and the prompt's token count."""

    prompt: Any
    generated: Any
    prompt_tokens: int | None = None


def parse_vllm(
    sample_id: int,
    routed_experts: Any,
    *,
    num_tokens: int,
    spec: RouteSpec,
    prompt_routed_experts: Any = None,
    prompt_tokens: int | None = None,
) -> RoutePayload:
    """vLLM's routes of one sample (``enable_return_routed_experts``), int16.

    Split layout (what vLLM returns): ``prompt_routed_experts`` ``[P, layers, topk]`` from the
    request output and the completion's ``routed_experts`` ``[G, layers, topk]``, prompt rows
    first; ``P + G`` is ``num_tokens - 1`` or ``num_tokens``. ``prompt_tokens``, when given,
    must equal ``P``: a prompt whose rows are short (e.g. a prefix-cache hit that skipped the
    routers) would otherwise shift every completion row onto the wrong token.
    Combined layout (older engines): ``routed_experts`` alone holds all rows,
    ``[num_tokens - 1 (or num_tokens), layers, topk]``.
    """
    if prompt_routed_experts is None:
        return parse_routes(
            sample_id,
            routed_experts,
            num_tokens=num_tokens,
            spec=spec,
            source="vllm routed_experts",
        )
    where = f"sample {sample_id}"
    prompt = codec.as_numpy(prompt_routed_experts, what=f"{where} (vllm prompt_routed_experts)")
    generated = codec.as_numpy(routed_experts, what=f"{where} (vllm routed_experts)")
    if prompt.ndim != 3 or generated.ndim != 3 or prompt.shape[1:] != generated.shape[1:]:
        raise ValueError(
            f"{where} (vllm): prompt_routed_experts {tuple(prompt.shape)} and routed_experts "
            f"{tuple(generated.shape)} do not stack into [tokens, layers, topk]"
        )
    if prompt_tokens is not None and prompt.shape[0] != prompt_tokens:
        raise ValueError(
            f"{where} (vllm prompt_routed_experts): {prompt.shape[0]} rows for a prompt of "
            f"{prompt_tokens} tokens (one row per prompt token expected)"
        )
    return parse_routes(
        sample_id,
        np.concatenate([prompt, generated]),
        num_tokens=num_tokens,
        spec=spec,
        source="vllm prompt_routed_experts + routed_experts",
    )


def parse_mcore(
    sample_id: int, routing_indices: Any, *, num_tokens: int, spec: RouteSpec
) -> RoutePayload:
    """megatron-core inference ``routing_indices``: ``[total_tokens - 1, layers, topk]``."""
    return parse_routes(
        sample_id, routing_indices, num_tokens=num_tokens, spec=spec, source="mcore routing_indices"
    )


def parse_sglang(
    sample_id: int,
    routed_experts: str | bytes,
    *,
    num_tokens: int,
    spec: RouteSpec,
    reported_layers: int | None = None,
) -> RoutePayload:
    """SGLang ``meta_info["routed_experts"]``: base64 of flattened little-endian int32.

    The flat array carries no shape, so the layer axis is ``reported_layers`` when given, else
    whichever of ``num_layers`` / MoE-layer count (with ``num_tokens - 1`` or ``num_tokens``
    rows) matches the element count. SGLang writes ``-1`` in dense-layer columns, so an
    all-layers reading is accepted only where every dense column holds ``-1``: MoE-only rows that
    happen to have the all-layers element count are never read as all layers (which would drop
    rows). Two readings that both pass are an error asking for ``reported_layers``.
    """
    where, source = f"sample {sample_id}", "sglang routed_experts"
    try:
        raw = binascii.a2b_base64(routed_experts, strict_mode=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise ValueError(f"{where} ({source}): bad base64: {error}") from error
    if len(raw) % 4:
        raise ValueError(f"{where} ({source}): {len(raw)} bytes is not a whole number of int32 ids")
    flat = np.frombuffer(raw, dtype="<i4")
    per_row = flat.size // spec.topk if flat.size % spec.topk == 0 else None
    candidates = (
        [reported_layers]
        if reported_layers is not None
        else sorted({spec.num_layers, len(spec.moe_layers)})
    )
    shapes = [
        (rows, layers)
        for layers in candidates
        for rows in (num_tokens - 1, num_tokens)
        if per_row is not None and rows * layers == per_row and rows >= 0
    ]
    if flat.size == 0 and num_tokens == 1:  # no rows: the layer axis is irrelevant
        shapes = [(0, len(spec.moe_layers))]
    if not shapes:
        raise ValueError(
            f"{where} ({source}): {flat.size} ids do not form [{num_tokens - 1} or {num_tokens} "
            f"rows, {' or '.join(str(c) for c in candidates)} layers, topk {spec.topk}]"
        )
    refused = {
        shape: fault for shape in shapes if (fault := _dense_column_fault(flat, shape, spec))
    }
    if refused and len(refused) == len(shapes):
        (rows, layers), fault = next(iter(refused.items()))
        raise ValueError(
            f"{where} ({source}): {flat.size} ids read as {rows} rows x {layers} layers (all "
            f"layers) would hold expert ids in a dense layer ({fault}); SGLang writes -1 there, "
            "so these are not all-layers rows"
            + ("" if reported_layers is None else f" (reported_layers={reported_layers})")
        )
    shapes = [shape for shape in shapes if shape not in refused]
    if len(shapes) > 1:
        raise ValueError(
            f"{where} ({source}): {flat.size} ids match several shapes {shapes} "
            "(rows, layers), each a valid reading; pass reported_layers"
        )
    rows, layers = shapes[0]
    return parse_routes(
        sample_id,
        flat.reshape(rows, layers, spec.topk),
        num_tokens=num_tokens,
        spec=spec,
        source=source,
    )


def parse_frame(sample_id: int, frame: Any, *, num_tokens: int, spec: RouteSpec) -> RoutePayload:
    """A codec frame (bytes-like, or its base64 text envelope as ``str``)."""
    where = f"sample {sample_id}"
    if isinstance(frame, str):
        array = codec.decode_text(frame, num_experts=spec.num_experts, what=where)
    else:
        array = codec.decode(frame, num_experts=spec.num_experts, what=where)
    return parse_routes(sample_id, array, num_tokens=num_tokens, spec=spec, source="codec frame")


def parse_engine_output(
    sample_id: int, output: Any, *, num_tokens: int, spec: RouteSpec
) -> RoutePayload:
    """Dispatch on the shape of an engine's per-sample output (mapping or object):
    ``routed_experts`` array (vLLM; with ``prompt_routed_experts`` beside it, the split layout),
    ``routed_experts`` / ``meta_info.routed_experts`` string
    (SGLang), ``routing_indices`` (megatron-core)."""

    def get(obj: Any, key: str) -> Any:
        if isinstance(obj, Mapping):
            return obj.get(key)
        return getattr(obj, key, None)

    meta = get(output, "meta_info")
    for holder in (output, meta):
        if holder is None:
            continue
        value = get(holder, "routed_experts")
        if isinstance(value, (str, bytes)):
            return parse_sglang(sample_id, value, num_tokens=num_tokens, spec=spec)
        if value is not None:
            return parse_vllm(
                sample_id,
                value,
                num_tokens=num_tokens,
                spec=spec,
                prompt_routed_experts=get(holder, "prompt_routed_experts"),
            )
        value = get(holder, "routing_indices")
        if value is not None:
            return parse_mcore(sample_id, value, num_tokens=num_tokens, spec=spec)
    raise ValueError(
        f"sample {sample_id}: no routes in engine output (looked for routed_experts, "
        "meta_info.routed_experts, routing_indices)"
    )


# ---------------------------------------------------------------------------------- helpers
def _dense_column_fault(flat: np.ndarray, shape: tuple[int, int], spec: RouteSpec) -> str | None:
    """Why ``flat`` read as ``shape`` (rows, all layers) is not SGLang output: the first dense
    layer and token holding an id other than ``-1``; None when it may be (or is MoE-only)."""
    rows, layers = shape
    if layers != spec.num_layers or layers == len(spec.moe_layers) or rows == 0:
        return None
    dense = [layer - 1 for layer in range(1, layers + 1) if layer not in spec.moe_layers]
    columns = flat.reshape(rows, layers, spec.topk)[:, dense]
    bad = (columns != -1).any(axis=2)
    if not bad.any():
        return None
    token, column = divmod(int(np.flatnonzero(bad)[0]), len(dense))
    return f"layer {dense[column] + 1}, token {token}: {columns[token, column].tolist()}"


def _layer_columns(where: str, source: str, got: int, spec: RouteSpec) -> list[int] | None:
    """Columns of the MoE layers in an axis of ``got`` layers; None = already MoE-only."""
    num_moe = len(spec.moe_layers)
    if got == num_moe:
        return None
    if got == spec.num_layers:
        return [layer - 1 for layer in spec.moe_layers]
    hint = ""
    if spec.mtp_num_layers and got in (
        num_moe + spec.mtp_num_layers,
        spec.num_layers + spec.mtp_num_layers,
    ):
        hint = f"; it looks like {spec.mtp_num_layers} MTP layer(s) are included: drop them"
    raise ValueError(
        f"{where} ({source}): expected a layer axis of {spec.num_layers} (all layers) or "
        f"{num_moe} (MoE layers only), got {got}{hint}"
    )


def _check_range(
    where: str, source: str, rows: np.ndarray, spec: RouteSpec, check_rows: bool
) -> None:
    """Ids in [-1, num_experts), naming sample, layer and token. When an id is out of range,
    an earlier row fault (partial -1, duplicate) is named instead, so the token named is the
    first bad one whatever its fault (slow path: only rows up to the bad id are scanned)."""
    bad = codec.first_bad_id(rows, spec.num_experts)
    if bad is None:
        return
    (token, column, _), value = bad
    if check_rows:
        earlier = _first_row_fault(rows[: token + 1], spec)
        if earlier is not None and earlier[0] < token * rows.shape[1] + column:
            _raise_at(where, source, rows, spec, *earlier)
    raise ValueError(
        f"{where}, layer {spec.moe_layers[column]}, token {token} ({source}): expert id "
        f"{value} out of range [-1, {spec.num_experts})"
    )


def _check_rows(where: str, source: str, rows: np.ndarray, spec: RouteSpec) -> None:
    """No partial -1 rows, no duplicate ids in a row, naming sample, layer and token."""
    fault = _first_row_fault(rows, spec)
    if fault is not None:
        _raise_at(where, source, rows, spec, *fault)


def _first_row_fault(rows: np.ndarray, spec: RouteSpec) -> tuple[int, str] | None:
    """(flat token x layer index, kind) of the first row that mixes -1 with ids or repeats an
    id, over both kinds; None when every row is valid."""
    if rows.size == 0:
        return None
    # One [topk, rows] copy, then whole-array compares: numpy reductions and sorts over a short
    # last axis cost ~10x more than these passes over long contiguous arrays.
    slots = np.ascontiguousarray(rows.reshape(-1, spec.topk).T)
    is_fallback = slots == -1
    some, every = is_fallback.any(axis=0), is_fallback.all(axis=0)
    partial = some & ~every
    duplicate = np.zeros(slots.shape[1], dtype=bool)
    same = np.empty_like(duplicate)
    for i in range(spec.topk):
        for j in range(i + 1, spec.topk):
            np.logical_or(duplicate, np.equal(slots[i], slots[j], out=same), out=duplicate)
    duplicate &= ~some
    bad = np.logical_or(duplicate, partial, out=duplicate)  # in place: no new row mask
    if not bad.any():
        return None
    flat = int(np.flatnonzero(bad)[0])
    return flat, "mixes" if partial[flat] else "duplicate"


def _raise_at(
    where: str, source: str, rows: np.ndarray, spec: RouteSpec, flat: int, kind: str
) -> NoReturn:
    token, column = divmod(flat, rows.shape[1])
    row = rows[token, column].tolist()
    prefix = f"{where}, layer {spec.moe_layers[column]}, token {token} ({source})"
    if kind == "mixes":
        raise ValueError(
            f"{prefix}: a row mixes -1 with expert ids {row}; expected all -1 (live fallback) "
            "or topk distinct ids"
        )
    raise ValueError(f"{prefix}: duplicate expert id in {row}; expected {spec.topk} distinct ids")
