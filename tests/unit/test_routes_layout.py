"""Alignment: CP zig-zag identical to megatron-core's split of input_ids, SP slices in router
order, exact split/unsplit inverses, PP/VP layer slicing identical to megatron-core's, and
vLLM / SGLang responses all the way to validated session routes."""

from __future__ import annotations

import base64
import contextlib
import inspect
from itertools import pairwise
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_pr2.replay.routes import validate_routes
from megatron_pr2.routes import layout as L
from megatron_pr2.routes import payload as P
from megatron_pr2.routes.fill import spread_routes


# ------------------------------------------------------------------------ megatron references
@contextlib.contextmanager
def _cp_state(cp_size: int, cp_rank: int):
    """Make megatron's CP helper see (cp_size, cp_rank) without a process group."""
    from megatron.core import parallel_state

    with (
        mock.patch.object(parallel_state, "get_context_parallel_world_size", lambda: cp_size),
        mock.patch.object(parallel_state, "get_context_parallel_rank", lambda: cp_rank),
        mock.patch.object(torch.distributed, "get_world_size", lambda group=None: cp_size),
        mock.patch.object(torch.distributed, "get_rank", lambda group=None: cp_rank),
    ):
        yield


def megatron_cp_split(tokens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """megatron-core's own ``get_batch_on_this_cp_rank`` on a ``[b, s]`` tensor (0.16 and 0.19
    signatures)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    with _cp_state(cp_size, cp_rank):
        if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
            batch = {"tokens": tokens.clone(), "cu_seqlens": None}
            out = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=object())
        else:
            out = get_batch_on_this_cp_rank({"tokens": tokens.clone()})
    return out["tokens"]


def megatron_router_rows(model_input: torch.Tensor, layout, coords) -> torch.Tensor:
    """Reference rows: megatron's CP split (per THD sequence: TE's per-document zig-zag is the
    same split applied to each padded sequence), then [s, b] order, then the SP chunk."""
    if layout.packed and coords.cp_size > 1:
        starts = layout.cu_seqlens_padded.tolist()
        local = torch.cat(
            [
                megatron_cp_split(model_input[:, a:b], coords.cp_size, coords.cp_rank)
                for a, b in pairwise(starts)
            ],
            dim=1,
        )
    else:
        local = megatron_cp_split(model_input, coords.cp_size, coords.cp_rank)
    rows = local.t().reshape(-1)  # [s, b] sequence-major, as the router sees it
    if coords.sequence_parallel and coords.tp_size > 1:
        rows = rows.chunk(coords.tp_size)[coords.tp_rank]
    return rows


def ranks(cp: int, tp: int, sp: bool):
    for cp_rank in range(cp):
        for tp_rank in range(tp):
            yield L.RankCoords(tp, tp_rank, sp, cp, cp_rank)


# ------------------------------------------------------------------------ layouts (strategies)
@st.composite
def layouts(draw, max_samples: int = 5):
    cp = draw(st.sampled_from([1, 2, 4]))
    tp = draw(st.sampled_from([1, 2, 4]))
    sp = draw(st.booleans())
    n = draw(st.integers(1, max_samples))
    ids = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    multiple = (2 * cp if cp > 1 else 1) * (tp if sp else 1) * draw(st.sampled_from([1, 2]))
    make = L.MicrobatchLayout.thd if draw(st.booleans()) else L.MicrobatchLayout.bshd
    layout = make(ids, lengths, pad_multiple=multiple)
    return layout, cp, tp, sp


def identity_input(layout) -> torch.Tensor:
    """Token-identity model input: slot s holds s (padding included)."""
    return torch.arange(layout.num_slots).view(layout.batch_size, layout.seq_length)


# ------------------------------------------------------------------------ CP / SP vs megatron
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_bshd_cp_split_matches_megatron_get_batch_on_this_cp_rank(cp, batch):
    seq = 8 * cp
    layout = L.MicrobatchLayout.bshd(range(batch), [seq - i for i in range(batch)], seq_length=seq)
    tokens = identity_input(layout)
    for rank in range(cp):
        ours = L.cp_zigzag_slots(layout, cp, rank)
        assert torch.equal(ours, megatron_cp_split(tokens, cp, rank)), rank


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_router_rows_match_megatron_cp_then_sequence_major_sp(case):
    layout, cp, tp, sp = case
    tokens = identity_input(layout)
    for coords in ranks(cp, tp, sp):
        expected = megatron_router_rows(tokens, layout, coords)
        assert torch.equal(L.local_slots(layout, coords), expected), coords
        assert torch.equal(L.rank_view(tokens, layout, coords), expected), coords


def test_sp_slice_is_rows_r_times_s_over_tp_times_b():
    layout = L.MicrobatchLayout.bshd([10, 11], [8, 5], seq_length=8)  # b = 2, s = 8
    for r in range(4):
        rows = L.local_slots(layout, L.RankCoords(4, r, True))
        order = torch.arange(16).view(2, 8).t().reshape(-1)  # [s, b] flattened
        assert torch.equal(rows, order[r * 2 * 2 : (r + 1) * 2 * 2])
    no_sp = L.local_slots(layout, L.RankCoords(4, 3, False))
    assert no_sp.numel() == 16  # without SP every TP rank routes every token


# ------------------------------------------------------------------------ inverses
@settings(max_examples=80, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1))
def test_pack_cp_sp_then_gather_gives_back_the_original(case, seed):
    layout, cp, tp, sp = case
    gen = torch.Generator().manual_seed(seed)
    per_sample = [torch.randint(0, 1000, (n, 3), generator=gen) for n in layout.lengths]
    parts = {
        (c.cp_rank, c.tp_rank): L.rank_tokens(per_sample, layout, c, pad_value=-7)
        for c in ranks(cp, tp, sp)
    }
    back = L.assemble(parts, layout, cp_size=cp, tp_size=tp, sequence_parallel=sp)
    for original, restored in zip(per_sample, back):
        assert torch.equal(original, restored)
    # packing into the model input and splitting that gives the same rows
    model_input = L.pack_model_input(per_sample, layout, pad_value=-7)
    for c in ranks(cp, tp, sp):
        assert torch.equal(L.rank_view(model_input, layout, c), parts[(c.cp_rank, c.tp_rank)])
    # token keys: each (sample, position) exactly once over the ranks (once per TP rank w/o SP)
    keys = torch.cat([L.rank_token_keys(layout, c) for c in ranks(cp, tp, sp)])
    valid = keys[keys >= 0]
    expected = torch.cat(
        [
            (torch.tensor(s) << 32) | torch.arange(n)
            for s, n in zip(layout.sample_ids, layout.lengths)
        ]
    )
    copies = 1 if sp or tp == 1 else tp
    assert torch.equal(valid.sort().values, expected.repeat_interleave(copies).sort().values)
    assert keys[keys < 0].unique().numel() * copies == (keys < 0).sum()  # padding keys unique


@settings(max_examples=40, deadline=None)
@given(layouts(max_samples=4), st.integers(0, 2**31 - 1))
def test_routes_take_the_same_path_as_every_other_per_token_tensor(case, seed):
    layout, cp, tp, sp = case
    spec = P.RouteSpec(num_layers=3, num_experts=24, topk=3, moe_layer_freq=[1, 0, 1])
    rng = np.random.default_rng(seed)
    payloads = []
    for sid, n in zip(layout.sample_ids, layout.lengths):
        rows = rng.permuted(np.tile(np.arange(24), ((n - 1) * 2, 1)), axis=1)[:, :3]
        rows = rows.reshape(n - 1, 2, 3)
        payloads.append(P.parse_mcore(sid, rows, num_tokens=n, spec=spec))
    for c in ranks(cp, tp, sp):
        routes = L.routes_for_rank(reversed(payloads), layout, c, spec.moe_layers)
        valid = L.rank_valid_mask(layout, c)
        slots = L.local_slots(layout, c)
        for column, layer in enumerate(spec.moe_layers):
            got = routes[layer]
            assert got.dtype == torch.int8 and got.is_contiguous()
            ref = L.rank_tokens(
                [torch.from_numpy(p.routes[:, column]) for p in payloads], layout, c
            )
            assert torch.equal(got[valid], ref[valid])
            filler = spread_routes(slots[~valid], [layer], 3, 24)[:, 0]
            assert torch.equal(got[~valid].long(), filler)
            validate_routes(got, layer=layer, num_experts=24, topk=3, num_tokens=valid.numel())


# ------------------------------------------------------------------------ errors
def test_cp_not_dividing_a_packed_sequence_names_the_sample():
    layout = L.MicrobatchLayout.thd([4, 9], [8, 6], pad_multiple=2)
    with pytest.raises(
        ValueError, match=r"sample 9: padded length 6 is not divisible by 2\*CP = 4"
    ):
        L.local_slots(layout, L.RankCoords(cp_size=2, cp_rank=1))


def test_cp_not_dividing_seq_length():
    layout = L.MicrobatchLayout.bshd([4], [5], seq_length=6)
    with pytest.raises(ValueError, match=r"sample 4: seq_length 6 is not divisible by 2\*CP = 4"):
        L.local_slots(layout, L.RankCoords(cp_size=2))


def test_tp_not_dividing_the_local_length_under_sp():
    layout = L.MicrobatchLayout.thd([1, 2], [4, 4], pad_multiple=4)
    with pytest.raises(
        ValueError,
        match=r"microbatch of samples \[1, 2\]: per-CP-rank sequence length 4 is not divisible by TP = 3",
    ):
        L.local_slots(layout, L.RankCoords(tp_size=3, tp_rank=0, sequence_parallel=True, cp_size=2))


SPEC = P.RouteSpec(num_layers=2, num_experts=8, topk=2, moe_layer_freq=1)


def payload(sid: int, n: int) -> P.RoutePayload:
    rows = np.tile(np.array([[0, 1], [2, 3]], dtype=np.int16), (n - 1, 1, 1))
    return P.parse_vllm(sid, rows, num_tokens=n, spec=SPEC)


@pytest.mark.parametrize(
    "payloads, message",
    [
        ([payload(1, 4), payload(2, 3), payload(7, 2)], r"routes for sample 7: sample not in this microbatch \(samples \[1, 2\]\)"),
        ([payload(1, 4)], r"sample 2: no routes for a sample of this microbatch"),
        ([payload(1, 4), payload(2, 5)], r"sample 2: routes cover 5 tokens, expected 3"),
        ([payload(1, 4), payload(1, 4), payload(2, 3)], r"sample 1: two route payloads for one sample"),
        ([payload(1, 4), P.RoutePayload(2, np.zeros((3, 2, 2), np.int16), (1, 2), 300)], r"sample 2: topk 2 / num_experts 300 / dtype int16, expected 2 / 8 / int8 \(as sample 1\)"),
    ],
)  # fmt: skip
def test_route_assembly_errors_name_the_sample(payloads, message):
    layout = L.MicrobatchLayout.thd([1, 2], [4, 3])
    with pytest.raises(ValueError, match=message):
        L.routes_for_rank(payloads, layout, L.RankCoords(), [1, 2])


def test_missing_layer_names_sample_and_layer():
    layout = L.MicrobatchLayout.thd([1], [4])
    with pytest.raises(
        ValueError,
        match=r"sample 1, layer 3: no routes for this layer \(payload has layers \[1, 2\]\)",
    ):
        L.routes_for_rank([payload(1, 4)], layout, L.RankCoords(), [2, 3])


def test_missing_sample_routes_live_with_fallback_spec():
    layout = L.MicrobatchLayout.thd([1, 2], [4, 3])
    routes = L.routes_for_rank([payload(1, 4)], layout, L.RankCoords(), [2], fallback_spec=SPEC)
    assert (routes[2][4:] == -1).all() and (routes[2][:3] >= 0).all()


def test_stray_routes_for_the_batch_are_refused():
    layouts = [L.MicrobatchLayout.thd([1], [4]), L.MicrobatchLayout.thd([2], [3])]
    with pytest.raises(
        ValueError, match=r"routes for sample\(s\) \[5\]: not in any microbatch of this rank"
    ):
        L.batch_routes([payload(1, 4), payload(2, 3), payload(5, 3)], layouts, L.RankCoords(), [1])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: L.MicrobatchLayout.thd([1, 1], [2, 3]), r"sample\(s\) \[1\] appear more than once"),
        (lambda: L.MicrobatchLayout.thd([], []), r"a microbatch needs at least one sample"),
        (lambda: L.MicrobatchLayout((1, 2), (3,), (3,), True), r"2 sample ids but 1 lengths / 1 padded lengths"),
        (lambda: L.MicrobatchLayout.thd([1], [0]), r"sample 1: expected 1 <= length <= padded length 0, got 0"),
        (lambda: L.MicrobatchLayout.thd([1], [3], pad_multiple=0), r"pad_multiple must be >= 1, got 0"),
        (lambda: L.MicrobatchLayout.thd([-1], [3]), r"sample -1: id must be in \[0, 2147483647\]"),
        (lambda: L.MicrobatchLayout.bshd([3], [9], seq_length=8), r"sample 3: length 9 exceeds seq_length 8"),
        (lambda: L.RankCoords(tp_size=2, tp_rank=2), r"tp: need size >= 1 and 0 <= rank < size, got 2/2"),
        (lambda: L.RankCoords(cp_size=0), r"cp: need size >= 1"),
        (lambda: L.rank_tokens([torch.zeros(3)], L.MicrobatchLayout.thd([1], [4]), L.RankCoords()), r"sample 1: expected 4 tokens, got shape \(3,\)"),
        (lambda: L.rank_tokens([], L.MicrobatchLayout.thd([1], [4]), L.RankCoords()), r"expected tensors for 1 samples \[1\], got 0"),
        (lambda: L.rank_view(torch.zeros(2, 4), L.MicrobatchLayout.thd([1], [4]), L.RankCoords()), r"model input: expected leading shape \(1, 4\), got \(2, 4\)"),
        (lambda: L.assemble({}, L.MicrobatchLayout.thd([1], [4])), r"assemble: no rows from rank \(cp 0, tp 0\)"),
        (lambda: L.assemble({(0, 0): torch.zeros(3)}, L.MicrobatchLayout.thd([1], [4])), r"assemble: rank \(cp 0, tp 0\): expected 4 rows, got 3"),
        (lambda: L.stack_microbatches([{1: None}, {2: None}]), r"microbatch 1: routes for layers \[2\], expected \[1\]"),
    ],
)  # fmt: skip
def test_bad_layouts_and_inputs(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_layout_metadata_and_coords_from_megatron(megatron_world1):
    layout = L.MicrobatchLayout.thd([5, 6], [3, 9], pad_multiple=4)
    assert layout.cu_seqlens.tolist() == [0, 3, 12] and layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens_padded.tolist() == [0, 4, 16] and layout.num_slots == 16
    assert L.rank_valid_mask(layout, L.RankCoords()).sum() == 12
    assert L.RankCoords.from_megatron(sequence_parallel=False) == L.RankCoords()
    again = L.MicrobatchLayout.from_cu_seqlens([5, 6], layout.cu_seqlens, layout.cu_seqlens_padded)
    assert again == layout
    with pytest.raises(ValueError, match=r"2 samples need cu_seqlens of 3 entries, got 2 / 3"):
        L.MicrobatchLayout.from_cu_seqlens([5, 6], [0, 3], [0, 4, 16])
    with pytest.raises(
        ValueError, match=r"sample 6: expected 1 <= length <= padded length 8, got 9"
    ):
        L.MicrobatchLayout.from_cu_seqlens([5, 6], [0, 3, 12], [0, 8, 16])


def test_assemble_detects_disagreeing_tp_ranks():
    layout = L.MicrobatchLayout.thd([1], [4])
    parts = {(0, 0): torch.arange(4), (0, 1): torch.arange(4) + 1}
    with pytest.raises(ValueError, match=r"rank \(cp 0, tp 1\) disagrees with an earlier rank"):
        L.assemble(parts, layout, tp_size=2, sequence_parallel=False)


# ------------------------------------------------------------------------ DP / microbatches
def test_dp_shard_and_microbatches_are_contiguous_and_strict():
    samples = list(range(12))
    assert L.dp_shard(samples, 3, 1) == [4, 5, 6, 7]
    assert L.split_microbatches(L.dp_shard(samples, 2, 1), 2) == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ValueError, match=r"12 samples do not split evenly over DP = 5"):
        L.dp_shard(samples, 5, 0)
    with pytest.raises(ValueError, match=r"dp: need size >= 1 and 0 <= rank < size, got 3/3"):
        L.dp_shard(samples, 3, 3)
    with pytest.raises(ValueError, match=r"12 samples do not split into microbatches of 5"):
        L.split_microbatches(samples, 5)
    with pytest.raises(ValueError, match=r"micro_batch_size must be >= 1, got 0"):
        L.split_microbatches(samples, 0)


# ------------------------------------------------------------------------ layers per stage
def _pp_configs():
    for num_layers, pp, vp, first, last, emb, loss in [
        (8, 2, None, None, None, False, False),
        (8, 4, None, None, None, False, False),
        (8, 2, 2, None, None, False, False),
        (8, 2, 4, None, None, False, False),
        (12, 3, 2, None, None, False, False),
        (10, 4, None, 1, 3, False, False),
        (10, 3, None, 2, None, False, False),
        (10, 3, None, None, 4, False, False),
        (14, 4, 2, 2, 4, False, False),
        (16, 4, 2, 4, None, False, False),
        (12, 2, 3, None, None, False, False),
        (7, 2, None, None, None, True, False),
        (7, 2, None, None, None, False, True),
        (6, 2, None, None, None, True, True),
        (14, 4, 2, None, None, True, True),
        (11, 3, 2, None, None, True, False),
    ]:
        yield SimpleNamespace(
            num_layers=num_layers,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
            account_for_embedding_in_pipeline_split=emb,
            account_for_loss_in_pipeline_split=loss,
            pipeline_model_parallel_layout=None,
        )


@pytest.mark.parametrize("config", list(_pp_configs()), ids=lambda c: str(vars(c)))
def test_stage_layers_match_megatron_offset_and_count(config):
    seen: list[int] = []
    vp = config.virtual_pipeline_model_parallel_size
    for stage in range(vp or 1):
        for pp_rank in range(config.pipeline_model_parallel_size):
            vp_stage = stage if vp else None
            theirs = L.megatron_stage_layer_numbers(config, pp_rank, vp_stage)
            ours = L.stage_layer_numbers(
                config.num_layers,
                pp_size=config.pipeline_model_parallel_size,
                pp_rank=pp_rank,
                vp_size=vp,
                vp_stage=vp_stage,
                num_layers_in_first_pipeline_stage=config.num_layers_in_first_pipeline_stage,
                num_layers_in_last_pipeline_stage=config.num_layers_in_last_pipeline_stage,
                account_for_embedding_in_pipeline_split=config.account_for_embedding_in_pipeline_split,
                account_for_loss_in_pipeline_split=config.account_for_loss_in_pipeline_split,
            )
            assert ours == theirs, (pp_rank, vp_stage)
            seen.extend(ours)
    assert seen == list(
        range(1, config.num_layers + 1)
    )  # chunk-major order covers every layer once


def test_rank_moe_layers_partition_the_moe_layers_over_pp_ranks():
    spec = P.RouteSpec(num_layers=8, num_experts=8, topk=2, moe_layer_freq=[0, 1, 1, 0, 1, 1, 1, 1])
    per_rank = [
        rank_layers := L.rank_moe_layers(spec, pp_size=2, pp_rank=r, vp_size=2) for r in range(2)
    ]
    assert per_rank == [[2, 5, 6], [3, 7, 8]] and rank_layers == [3, 7, 8]
    uneven = [
        L.rank_moe_layers(spec, pp_size=3, pp_rank=r, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2)
        for r in range(3)
    ]  # fmt: skip
    assert uneven == [[2], [3, 5, 6], [7, 8]]
    assert L.rank_moe_layers(spec) == [2, 3, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"pp_size": 3}, r"8 layers do not split over PP = 3"),
        ({"pp_size": 2, "vp_size": 3}, r"4 layers of pipeline stage 0 do not split over VP = 3"),
        ({"pp_size": 2, "pp_rank": 2}, r"pp: need 0 <= rank < size, got 2/2"),
        ({"pp_size": 2, "vp_size": 2, "vp_stage": 2}, r"vp: need 0 <= vp_stage < vp_size, got 2/2"),
        ({"pp_size": 4, "num_layers_in_first_pipeline_stage": 1}, r"7 middle layers do not split over 3 middle stages"),
        ({"pp_size": 2, "num_layers_in_first_pipeline_stage": 1, "account_for_loss_in_pipeline_split": True}, r"uneven pipeline stages cannot account"),
    ],
)  # fmt: skip
def test_bad_stage_configs(kw, message):
    with pytest.raises(ValueError, match=message):
        L.stage_layer_numbers(8, **kw)


# ------------------------------------------------------------------------ engine -> session
QWEN_LIKE = P.RouteSpec(num_layers=6, num_experts=32, topk=4, moe_layer_freq=[0, 1, 1, 1, 1, 1])


def vllm_response(num_tokens: int, seed: int) -> dict:
    """vLLM ``CompletionOutput``-like: ``routed_experts`` numpy int16 [len - 1, layers, topk]
    over every decoder layer (the dense layer's column holds zeros)."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(32)[:4] for _ in range((num_tokens - 1) * 6)])
    rows = rows.reshape(num_tokens - 1, 6, 4).astype(np.int16)
    rows[:, 0] = 0
    return {"token_ids": list(range(num_tokens)), "routed_experts": rows}


def sglang_response(num_tokens: int, seed: int) -> dict:
    """SGLang ``/generate`` response: ``meta_info.routed_experts`` = base64 of int32 LE ids of
    positions [0, len - 1), every layer, -1 in the dense layer."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(32)[:4] for _ in range((num_tokens - 1) * 6)])
    rows = rows.reshape(num_tokens - 1, 6, 4).astype("<i4")
    rows[:, 0] = -1
    rows[2, 3] = -1  # one fallback route (layer 4, token 2)
    encoded = base64.b64encode(rows.tobytes()).decode("ascii")
    return {"text": "...", "meta_info": {"routed_experts": encoded, "completion_tokens": 3}}


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("packed", [True, False])
def test_engine_responses_to_validated_session_routes(engine, packed):
    make = vllm_response if engine == "vllm" else sglang_response
    lengths = {sid: 9 + 5 * (sid % 4) for sid in range(8)}  # prompt + response per sample
    outputs = {sid: make(n, sid) for sid, n in lengths.items()}
    payloads = [
        P.parse_engine_output(sid, outputs[sid], num_tokens=lengths[sid], spec=QWEN_LIKE)
        for sid in lengths
    ]
    dp_size, cp, tp, pp = 2, 2, 2, 2
    for dp_rank in range(dp_size):
        local = L.dp_shard(sorted(lengths), dp_size, dp_rank)
        batches = L.split_microbatches(local, 2)
        make_layout = L.MicrobatchLayout.thd if packed else L.MicrobatchLayout.bshd
        layouts = [
            make_layout(mb, [lengths[s] for s in mb], pad_multiple=2 * cp * tp) for mb in batches
        ]
        mine = [p for p in payloads if p.sample_id in local]
        for pp_rank in range(pp):
            layers = L.rank_moe_layers(QWEN_LIKE, pp_size=pp, pp_rank=pp_rank)
            assert layers == ([2, 3] if pp_rank == 0 else [4, 5, 6])
            for coords in ranks(cp, tp, True):
                routes = L.batch_routes(mine, layouts, coords, layers)
                assert sorted(routes) == layers
                for layer, per_mb in routes.items():
                    assert len(per_mb) == len(layouts)
                    for mb, (layout, tensor) in enumerate(zip(layouts, per_mb)):
                        rows = L.local_slots(layout, coords).numel()
                        validate_routes(
                            tensor,
                            layer=layer,
                            num_experts=32,
                            topk=4,
                            num_tokens=rows,
                            microbatch=mb,
                        )
                        keys = L.rank_token_keys(layout, coords)
                        valid = keys >= 0
                        sample = keys[valid] >> 32
                        position = keys[valid] & 0xFFFFFFFF
                        column = layer - 2
                        for s in sample.unique().tolist():
                            p = next(q for q in payloads if q.sample_id == s)
                            at = sample == s
                            want = torch.from_numpy(p.routes[position[at].numpy(), column])
                            assert torch.equal(tensor[valid][at], want), (s, layer)
    fallback = sum(p.fallback_rows() for p in payloads)
    assert fallback == (8 if engine == "sglang" else 0)
