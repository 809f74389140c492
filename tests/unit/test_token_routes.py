"""Routes keyed by token (world 1, tiny GPT): recorded with micro-batch 4, replayed with
micro-batch 2 in another sample order and packed, each token gets its own recorded route.

Packing on CPU: megatron's ``thd`` format (``PackedSeqParams`` with ``cu_seqlens``) needs
Transformer Engine's attention; the local ``DotProductAttention`` asserts
``packed_seq_params is None`` (0.16.1 and 0.19.2). So a packed row here is samples concatenated
in one ``[1, n * SEQ]`` row with a block-diagonal causal ``attention_mask`` (megatron's local
attention takes an explicit boolean mask, True = blocked), which keeps every sample from
attending to the others. RoPE takes row positions (megatron's GPT ignores ``position_ids`` for
RoPE), but attention scores depend only on relative positions, which the mask keeps within
each sample: a packed sample computes what it computes alone, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from megatron_pr2.models.gpt import lm_forward_backward, model_device
from megatron_pr2.replay.token_routes import TokenRoutes
from megatron_pr2.routes.layout import MicrobatchLayout, RankCoords, rank_token_keys
from tests.support import replay_harness as h
from tests.unit.test_native_replay_api import LAYERS, one_hot, routing_maps

NUM_SAMPLES, SEQ = 8, h.SEQ


@dataclass
class Batch:
    """A microbatch with its own position ids (restarting per sample when packed)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # [1, 1, s, s] bool, True = blocked


def forward_step(batches, model) -> tuple[torch.Tensor, Callable]:
    batch = next(batches)
    device = model_device(model)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    output = model(
        batch.tokens.to(device), batch.position_ids.to(device), mask, labels=batch.labels.to(device)
    )

    def loss_func(per_token_loss: torch.Tensor):
        mask = batch.loss_mask.to(per_token_loss.device, per_token_loss.dtype)
        loss = (per_token_loss * mask).sum() / mask.sum()
        return loss, {"lm_loss": loss.detach()}

    return output, loss_func


def samples() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, h.SHAPE.vocab_size, (NUM_SAMPLES, SEQ + 1), generator=g)


def bshd(groups: Sequence[Sequence[int]]) -> tuple[list[Batch], list[torch.Tensor]]:
    """One ``[len(group), SEQ]`` microbatch per group of sample ids, and its token keys."""
    data, batches, keys = samples(), [], []
    for ids in groups:
        rows = data[list(ids)]
        positions = torch.arange(SEQ).expand(len(ids), SEQ)
        batches.append(Batch(rows[:, :-1], rows[:, 1:], torch.ones(len(ids), SEQ), positions))
        keys.append(rank_token_keys(MicrobatchLayout.bshd(ids, [SEQ] * len(ids)), RankCoords()))
    return batches, keys


def sample_mask(num_samples: int) -> torch.Tensor:
    """``[1, 1, s, s]`` block-diagonal causal mask of ``num_samples`` packed samples (True =
    blocked): a token sees the earlier tokens of its own sample only."""
    sample = torch.arange(num_samples * SEQ) // SEQ
    position = torch.arange(num_samples * SEQ)
    allowed = (sample[:, None] == sample[None, :]) & (position[None, :] <= position[:, None])
    return (~allowed).view(1, 1, *allowed.shape)


def packed(
    groups: Sequence[Sequence[int]], isolate_samples: bool = False
) -> tuple[list[Batch], list[torch.Tensor]]:
    """One ``[1, len(group) * SEQ]`` row per group (samples concatenated, positions restart);
    ``isolate_samples``: with the block-diagonal mask (else causal over the whole row)."""
    data, batches, keys = samples(), [], []
    for ids in groups:
        rows = data[list(ids)]
        tokens, labels = rows[:, :-1].reshape(1, -1), rows[:, 1:].reshape(1, -1)
        positions = torch.arange(SEQ).repeat(len(ids)).unsqueeze(0)
        mask = sample_mask(len(ids)) if isolate_samples else None
        ones = torch.ones_like(tokens, dtype=torch.float)
        batches.append(Batch(tokens, labels, ones, positions, mask))
        keys.append(rank_token_keys(MicrobatchLayout.thd(ids, [SEQ] * len(ids)), RankCoords()))
    return batches, keys


def run(chunks, batches, forward_only: bool = False) -> None:
    if forward_only:
        with torch.no_grad():
            lm_forward_backward(chunks, batches, True, forward_step)
    else:
        lm_forward_backward(chunks, batches, False, forward_step)


RECORDED = [[0, 1, 2, 3], [4, 5, 6, 7]]  # micro-batch 4, samples 0..7
PERMUTED = [[5, 2], [7, 0], [3, 6], [1, 4]]  # micro-batch 2, another order
PACKED = [[6, 1], [3, 4], [0, 7], [2, 5]]  # two samples per packed row


def record_then_drift():
    """Record the routes of samples 0..7 with micro-batch 4, then move the routers (as an
    update step would), so replayed routes visibly differ from live ones."""
    built = h.build("ours")
    batches, keys = bshd(RECORDED)
    with built.session.recording(keys) as record:
        run(built.chunks, batches, forward_only=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for weight in built.session.router_weights().values():
            weight.add_(torch.randn(weight.shape, generator=g) * weight.std())
    return built, record


def by_key(keys: Sequence[torch.Tensor], maps: dict[int, list[torch.Tensor]]):
    """``{layer: {token key: routing-map row}}`` of one pass."""
    out = {}
    for layer in LAYERS:
        out[layer] = {
            int(k): row for ks, m in zip(keys, maps[layer]) for k, row in zip(ks.tolist(), m)
        }
    return out


def replayed_per_token(built, routes, keys, batches, forward_only=True):
    with routing_maps(built.chunks) as maps:
        with built.session.replaying(routes, keys):
            run(built.chunks, batches, forward_only=forward_only)
    return by_key(keys, maps)


@pytest.mark.parametrize("layout", ["permuted", "packed"])
def test_replayed_routes_follow_the_token_across_micro_batching(world1, layout):
    built, record = record_then_drift()
    _, rec_keys = bshd(RECORDED)
    recorded = {
        layer: {
            int(k): one_hot(r)[i]
            for ks, r in zip(rec_keys, record.routes[layer])
            for i, k in enumerate(ks.tolist())
        }
        for layer in LAYERS
    }
    batches, keys = bshd(PERMUTED) if layout == "permuted" else packed(PACKED)
    with routing_maps(built.chunks) as live_maps:
        run(built.chunks, batches, forward_only=True)
    live = by_key(keys, live_maps)

    got = replayed_per_token(built, record.by_token().plan(keys), keys, batches)
    differs_from_live = 0
    for layer in LAYERS:
        assert got[layer].keys() == recorded[layer].keys()
        for key, row in got[layer].items():
            assert torch.equal(row, recorded[layer][key]), (layer, key)
            differs_from_live += int(not torch.equal(row, live[layer][key]))
    assert differs_from_live > 0  # the drift moved some tokens: replay is what fixed them

    # Negative control: the same recorded routes taken by (microbatch, row) hit other tokens.
    rows = [len(k) for k in keys]
    by_position = {
        layer: list(torch.cat(list(record.routes[layer])).split(rows)) for layer in LAYERS
    }
    wrong = replayed_per_token(built, by_position, keys, batches)
    assert any(
        not torch.equal(row, recorded[layer][key])
        for layer in LAYERS
        for key, row in wrong[layer].items()
    )


def replayed_grads(built, record, batches, keys) -> dict[str, torch.Tensor]:
    """Gradients of one replayed training pass, routes planned by token."""
    h.zero_grads(built.chunks)
    with built.session.replaying(record.by_token().plan(keys), keys):
        run(built.chunks, batches)
    return h.grads(built.chunks)


def test_gradients_equal_the_same_order_replay(world1):
    """Micro-batch 2 in a permuted order replays to the same gradients as micro-batch 4 in the
    recorded order (the loss is a mean over equal-size microbatches: order-independent)."""
    built, record = record_then_drift()
    same_batches, same_keys = bshd(RECORDED)
    with built.session.replaying(record.routes, same_keys):
        run(built.chunks, same_batches)
    same = h.grads(built.chunks)

    permuted = replayed_grads(built, record, *bshd(PERMUTED))
    assert same.keys() == permuted.keys()
    assert h.max_grad_diff(same, permuted) <= 1e-6


def test_packed_replay_gives_each_token_its_route_and_the_same_order_gradients(world1):
    """Recorded with micro-batch 4 (bshd), replayed packed: two samples per row, in another
    order, samples kept apart by the attention mask (see the module doc). Every token takes
    its recorded route, and the gradients are those of the same-order micro-batch 4 replay."""
    built, record = record_then_drift()
    same_batches, same_keys = bshd(RECORDED)
    with built.session.replaying(record.routes, same_keys):
        run(built.chunks, same_batches)
    same = h.grads(built.chunks)

    batches, keys = packed(PACKED, isolate_samples=True)
    with routing_maps(built.chunks) as maps:
        got = replayed_grads(built, record, batches, keys)
    used = by_key(keys, maps)
    for layer in LAYERS:
        recorded = {
            int(k): one_hot(r)[i]
            for ks, r in zip(same_keys, record.routes[layer])
            for i, k in enumerate(ks.tolist())
        }
        assert used[layer].keys() == recorded.keys()
        assert all(torch.equal(row, recorded[key]) for key, row in used[layer].items()), layer
    assert h.max_grad_diff(same, got) <= 1e-6

    # Negative controls: packed samples that attend to each other, and packed rows replayed
    # by (microbatch, row), give other gradients.
    leaking = replayed_grads(built, record, *packed(PACKED))
    assert h.max_grad_diff(same, leaking) > 1e-4
    h.zero_grads(built.chunks)
    rows = [len(k) for k in keys]
    by_position = {
        layer: list(torch.cat(list(record.routes[layer])).split(rows)) for layer in LAYERS
    }
    with built.session.replaying(by_position, keys):
        run(built.chunks, batches)
    assert h.max_grad_diff(same, h.grads(built.chunks)) > 1e-4


# ------------------------------------------------------------------ the value type alone
def _token_routes() -> TokenRoutes:
    keys = [torch.tensor([(1 << 32) | 0, (1 << 32) | 1, -5]), torch.tensor([0, 1])]
    routes = {3: [torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([[6, 7], [1, 0]])]}
    return TokenRoutes.from_microbatches(routes, keys)


def test_plan_gathers_by_key_and_routes_padding_live_only_when_asked():
    routes = _token_routes()
    assert len(routes) == 4  # the padding row is not recorded
    plan = routes.plan([torch.tensor([1, (1 << 32) | 1, -9, 0])], padding_live=True)
    assert plan[3][0].tolist() == [[1, 0], [2, 3], [-1, -1], [6, 7]]
    with pytest.raises(ValueError, match=r"layer 3 .*microbatch 0: token key -9 \(padding\)"):
        routes.plan([torch.tensor([1, -9])])


def test_plan_refuses_a_key_it_never_recorded_naming_layer_microbatch_and_key():
    with pytest.raises(
        ValueError, match=r"layer 3 .*microbatch 1: token key 8589934592 \(sample 2, position 0\)"
    ):
        _token_routes().plan([torch.tensor([0]), torch.tensor([1, 2 << 32])])


def test_a_key_recorded_twice_is_refused():
    keys = [torch.tensor([0, 1]), torch.tensor([1])]
    routes = {1: [torch.zeros(2, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)]}
    with pytest.raises(ValueError, match=r"token key 1 .* appears twice"):
        TokenRoutes.from_microbatches(routes, keys)


def test_by_token_needs_a_recording_with_keys(world1):
    built = h.build("ours")
    with built.session.recording() as record:
        run(built.chunks, bshd([[0, 1]])[0], forward_only=True)
    with pytest.raises(ValueError, match="recorded without token keys"):
        record.by_token()
