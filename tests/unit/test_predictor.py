"""PR2 on real megatron-core (world 1): zero predictor == R2, gradient isolation, recompute,
and a synthetic router-drift test in which the predictor learns the drift."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, lm_forward_backward, moe_transformer_config
from megatron_pr2.predictor.cache import FeatureCache, sampled, token_keys
from megatron_pr2.predictor.module import predictor_parameters
from megatron_pr2.replay.keys import MicrobatchKeys
from megatron_pr2.replay.session import ReplaySession
from tests.support import replay_harness as h


def build(mode: str, recompute: str = "off", seed: int = 5, shape=h.SHAPE, **predictor):
    predictor.setdefault("cache_keep_fraction", 1.0)  # tiny batches: cache every token
    torch.manual_seed(seed)
    config = moe_transformer_config(shape, **h.RECOMPUTE[recompute])
    replay = RouterReplayConfig(
        mode=mode, predictor=PredictorConfig(**predictor), metrics_token_stride=1
    )
    chunks = build_model_chunks(config, h.SHAPE.vocab_size, h.SEQ, replay_config=replay)
    return chunks, ReplaySession(chunks)


def split_grads(chunks):
    grads = h.grads(chunks)
    policy = {k: v for k, v in grads.items() if "evolution_predictor" not in k}
    predictor = {k: v for k, v in grads.items() if "evolution_predictor" in k}
    return policy, predictor


def record(chunks, session, batches):
    with torch.no_grad(), session.recording() as rec:
        losses = lm_forward_backward(chunks, batches, forward_only=True)
    return rec, losses


def test_zero_predictor_pr2_reproduces_r2_bit_for_bit(world1):
    batches = h.make_batches(3)
    r2_chunks, r2 = build("r2")
    pr2_chunks, pr2 = build("pr2")
    r2_rec, r2_old = record(r2_chunks, r2, batches)
    pr2_rec, pr2_old = record(pr2_chunks, pr2, batches)
    for layer in r2_rec.routes:
        for a, b in zip(r2_rec.routes[layer], pr2_rec.routes[layer]):
            assert torch.equal(a, b)
    for a, b in zip(r2_old, pr2_old):
        assert torch.equal(a["lm_loss"], b["lm_loss"])

    with r2.replaying(r2_rec.routes):
        r2_losses = lm_forward_backward(r2_chunks, batches)
    with pr2.replaying(pr2_rec.routes, predictor_loss=True):  # mini-step >= 1
        pr2_losses = lm_forward_backward(pr2_chunks, batches)
    for a, b in zip(r2_losses, pr2_losses):
        assert torch.equal(a["lm_loss"], b["lm_loss"])
    r2_policy, _ = split_grads(r2_chunks)
    pr2_policy, pr2_predictor = split_grads(pr2_chunks)
    assert r2_policy.keys() == pr2_policy.keys()
    for name in r2_policy:  # the predictor loss changes no policy gradient
        assert torch.equal(r2_policy[name], pr2_policy[name]), name
    assert len(pr2_predictor) == h.SHAPE.num_layers
    assert all(g.abs().sum() > 0 for g in pr2_predictor.values())


def test_policy_loss_changes_no_predictor_gradient(world1):
    batches = h.make_batches(2)
    other_labels = [
        type(b)(b.tokens, torch.roll(b.labels, 1, dims=1), b.loss_mask * 0.5) for b in batches
    ]
    results = []
    for data in (batches, other_labels):
        chunks, session = build("pr2")
        with torch.no_grad():
            for p in predictor_parameters(chunks):
                p.normal_(0, 0.05)  # a non-trivial predictor
        rec, _ = record(chunks, session, batches)
        with session.replaying(rec.routes, predictor_loss=True):
            lm_forward_backward(chunks, data)
        results.append(split_grads(chunks))
    (policy_a, pred_a), (policy_b, pred_b) = results
    assert any(not torch.equal(policy_a[k], policy_b[k]) for k in policy_a)
    for name in pred_a:
        assert torch.equal(pred_a[name], pred_b[name]), name


def test_no_predictor_gradient_at_mini_step_zero(world1):
    chunks, session = build("pr2")
    batches = h.make_batches(2)
    rec, _ = record(chunks, session, batches)
    with session.replaying(rec.routes, predictor_loss=False):
        lm_forward_backward(chunks, batches)
    _, predictor = split_grads(chunks)
    assert predictor == {}


@pytest.mark.parametrize("recompute", ["full", "selective_moe"])
def test_recompute_gives_identical_predictor_gradients(world1, recompute):
    batches = h.make_batches(3)
    grads = []
    for mode in ("off", recompute):
        chunks, session = build("pr2", recompute=mode)
        with torch.no_grad():
            for p in predictor_parameters(chunks):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        rec, _ = record(chunks, session, batches)
        with session.replaying(rec.routes, predictor_loss=True):
            lm_forward_backward(chunks, batches)
        grads.append(split_grads(chunks))
    assert h.max_grad_diff(grads[0][1], grads[1][1]) <= 1e-6
    assert h.max_grad_diff(grads[0][0], grads[1][0]) <= 1e-6


def test_predicted_routes_follow_logits_plus_offset(world1):
    chunks, session = build("pr2")
    batches = h.make_batches(1)
    with torch.no_grad():
        for p in predictor_parameters(chunks):
            p.normal_(0, 1.0)  # a large offset: predicted sets differ from live ones
    r2_chunks, r2 = build("r2")
    rec, _ = record(chunks, session, batches)
    live, _ = record(r2_chunks, r2, batches)
    differs = sum(
        int((a.sort(1).values != b.sort(1).values).any(1).sum())
        for layer in rec.routes
        for a, b in zip(rec.routes[layer], live.routes[layer])
    )
    assert differs > 0
    metrics = session.metrics()
    assert metrics["pr2/bias_to_logits_ratio"] > 1.0


# ------------------------------------------------------------------ feature cache
def test_cache_sampling_is_a_pure_function_of_the_key_and_respects_the_budget():
    keys = token_keys(torch.arange(64).repeat_interleave(32), torch.arange(32).repeat(64))
    mask = sampled(keys, 0.25)
    assert torch.equal(mask, sampled(keys.flip(0), 0.25).flip(0))  # order does not matter
    assert 0.18 < mask.float().mean() < 0.32
    cache = FeatureCache("bf16")
    cache.add(keys[mask], torch.randn(int(mask.sum()), 8), torch.randn(int(mask.sum()), 4))
    rows, positions = cache.locate(keys[:100])
    inputs, logits = cache.features(positions, "cpu")
    assert torch.equal(rows, mask[:100].nonzero().flatten())
    assert inputs.dtype == torch.float32 and inputs.shape == (rows.numel(), 8)
    assert logits.shape == (rows.numel(), 4)
    assert cache.nbytes == int(mask.sum()) * (8 + 2 * 8 + 2 * 4)


def test_caches_with_equal_keys_share_one_sorted_key_tensor_and_one_lookup(monkeypatch):
    """Every layer caches the same tokens: after sharing, a lookup computed for one layer's
    cache is reused (not recomputed) for the next, and equals a lookup of its own."""
    from megatron_pr2.predictor.state import PredictorState

    keys = token_keys(torch.arange(16).repeat_interleave(8), torch.arange(8).repeat(16))
    states = [PredictorState(PredictorConfig(cache_keep_fraction=0.5), topk=2) for _ in range(2)]
    for state in states:
        state.cache.add(keys[::3], torch.randn(keys[::3].numel(), 4), torch.randn(43, 6))
    other = FeatureCache("bf16")
    other.add(keys[1::3], torch.randn(keys[1::3].numel(), 4), torch.randn(43, 6))
    states[1].cache.share_keys_with(states[0].cache)
    other.share_keys_with(states[0].cache)  # different keys: keeps its own
    assert states[1].cache.sorted_keys is states[0].cache.sorted_keys
    assert other.sorted_keys is not states[0].cache.sorted_keys

    query = MicrobatchKeys(keys[:40])
    calls = []
    original = FeatureCache.locate

    def counting_locate(cache, host_keys):
        calls.append(cache)
        return original(cache, host_keys)

    monkeypatch.setattr(FeatureCache, "locate", counting_locate)
    found = [state._cached_rows(query) for state in states]
    monkeypatch.undo()
    assert calls == [states[0].cache]  # the second layer reused the first's lookup
    rows, positions = original(states[1].cache, keys[:40])
    for got_rows, got_positions in found:
        assert torch.equal(got_rows, rows) and torch.equal(got_positions, positions)
    assert torch.equal(rows, torch.arange(0, 40, 3))


def test_passes_that_fill_the_caches_leave_every_layer_sharing_one_key_tensor(world1):
    """Both ways the caches fill (pr2's recording pass, pr2_r3's replay pass with
    ``cache_features``) end with all layers on one sorted-key tensor; a plain replay does not
    touch the caches."""
    chunks, session = build("pr2")
    batches = h.make_batches(2)

    def key_tensors():
        return {id(session.state(layer).predictor.cache.sorted_keys) for layer in session.layers}

    rec, _ = record(chunks, session, batches)
    assert len(session.layers) > 1 and len(key_tensors()) == 1
    for state in (session.state(layer) for layer in session.layers):
        state.predictor.cache.clear()
    with torch.no_grad(), session.replaying(rec.routes, cache_features=True):
        lm_forward_backward(chunks, batches, forward_only=True)
    assert session.state(session.layers[0]).predictor.cache.num_tokens > 0
    assert len(key_tensors()) == 1


def test_microbatch_keys_derive_once_and_report_padding_only_when_present():
    keys = MicrobatchKeys(torch.tensor([5, 6, -1, 7], dtype=torch.int64))
    assert torch.equal(keys.padding_rows(), torch.tensor([False, False, True, False]))
    assert keys.padding_rows() is keys.padding_rows()
    assert MicrobatchKeys(torch.arange(4)).padding_rows() is None
    computed = []
    assert keys.derived("x", lambda: computed.append(1) or 3) == 3
    assert keys.derived("x", lambda: computed.append(1) or 4) == 3
    assert computed == [1]
    with pytest.raises(ValueError, match="1-D int64"):
        MicrobatchKeys(torch.arange(4, dtype=torch.int32))


def test_cache_bounded_by_token_budget(world1):
    chunks, session = build("pr2", cache_tokens_per_step=40)
    record(chunks, session, h.make_batches(4))  # 4 x 32 tokens per layer
    metrics = session.metrics()
    assert metrics["pr2/cache_tokens/layer_1"] == 40
    assert metrics["pr2/cache_bytes/layer_1"] == 40 * (8 + 2 * 32 + 2 * 8)


# ------------------------------------------------------------------ synthetic drift
def test_predictor_learns_a_fixed_router_drift_and_beats_r2(world1):
    """Every mini-step moves each router weight by a fixed drift D (so logits move by the
    input-dependent D @ h); each rollout batch starts again from the same router. The
    predictor's top-k accuracy against the drifted router must rise from its zero-predictor
    baseline to >= 0.95, and at mini-steps >= 1 pr2's replayed routes must match the drifted
    router more often than r2's.

    One MoE layer: its router input does not depend on routing, so the drifted logits are
    exactly a linear function of the cached input (deeper layers add input drift on top)."""
    kappa, rollouts = 2, 48
    shape = dataclasses.replace(h.SHAPE, num_layers=1)
    batches = h.make_batches(2)
    generator = torch.Generator().manual_seed(11)
    drift = {
        layer: 0.1 * torch.randn(shape.num_moe_experts, shape.hidden_size, generator=generator)
        for layer in range(1, shape.num_layers + 1)
    }

    def run(mode: str):
        chunks, session = build(mode, shape=shape)
        routers = {layer: session._routers[layer] for layer in session.layers}
        start = {layer: router.weight.detach().clone() for layer, router in routers.items()}
        params = predictor_parameters(chunks)
        optimizer = torch.optim.Adam(params, lr=5e-2) if params else None
        accuracy, zero_dev = [], []
        for _ in range(rollouts):
            with torch.no_grad():
                for layer, router in routers.items():
                    router.weight.copy_(start[layer])
            rec, _ = record(chunks, session, batches)
            for step in range(kappa):
                with torch.no_grad():
                    for layer, router in routers.items():
                        router.weight += drift[layer]
                for chunk in chunks:
                    chunk.zero_grad(set_to_none=True)
                with session.replaying(rec.routes, predictor_loss=step >= 1):
                    lm_forward_backward(chunks, batches)
                if optimizer is not None and step >= 1:
                    optimizer.step()
                metrics = session.metrics()
                if step >= 1:
                    zero_dev.append(metrics["router_replay/zero_deviation_ratio"])
                    accuracy.append(metrics.get("pr2/predictive_topk_accuracy"))
        return accuracy, zero_dev

    pr2_accuracy, pr2_zero_dev = run("pr2")
    _, r2_zero_dev = run("r2")
    assert pr2_accuracy[0] < 0.9, f"drift too small to be a test: {pr2_accuracy[0]:.3f}"
    assert min(pr2_accuracy[-3:]) >= 0.95, pr2_accuracy
    assert sum(pr2_zero_dev[-4:]) > sum(r2_zero_dev[-4:]), (pr2_zero_dev, r2_zero_dev)


def test_cache_finds_the_same_tokens_under_a_different_micro_batching(world1):
    """Record with microbatches {0,1},{2,3}; train with {3,0},{1,2}. Keyed by (sample,
    position), the predictor loss sees the same tokens: the same predictor gradient. Keyed by
    (microbatch, row) it would not (negative control)."""
    from megatron_pr2.models.gpt import LMBatch
    from megatron_pr2.routes.layout import MicrobatchLayout, RankCoords, rank_token_keys

    samples = h.make_batches(2)  # 2 microbatches x 2 samples
    tokens = torch.cat([b.tokens for b in samples])
    labels = torch.cat([b.labels for b in samples])

    def batches_and_keys(groups):
        batches, keys = [], []
        for group in groups:
            batches.append(LMBatch(tokens[group], labels[group], torch.ones(len(group), h.SEQ)))
            layout = MicrobatchLayout.bshd(group, [h.SEQ] * len(group), h.SEQ)
            keys.append(rank_token_keys(layout, RankCoords()))
        return batches, keys

    record_batches, record_keys = batches_and_keys([[0, 1], [2, 3]])

    def predictor_grads(groups, use_keys: bool):
        chunks, session = build("pr2")
        with torch.no_grad():
            for p in predictor_parameters(chunks):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        with torch.no_grad(), session.recording(record_keys if use_keys else None):
            lm_forward_backward(chunks, record_batches, forward_only=True)
        train_batches, train_keys = batches_and_keys(groups)
        live = {layer: [None] * len(groups) for layer in session.layers}  # live routing
        with session.replaying(live, train_keys if use_keys else None, predictor_loss=True):
            lm_forward_backward(chunks, train_batches)
        return split_grads(chunks)[1]

    same = predictor_grads([[0, 1], [2, 3]], use_keys=True)
    shuffled = predictor_grads([[3, 0], [1, 2]], use_keys=True)
    assert h.max_grad_diff(same, shuffled) <= 1e-6
    by_position = predictor_grads([[3, 0], [1, 2]], use_keys=False)
    assert h.max_grad_diff(same, by_position) > 1e-4


def test_predictor_metric_terms_stay_bounded_and_sum_exactly():
    """Per-call metric terms are list appends (no torch op); a run that never takes metrics
    must not grow them without bound, and folding must not change the sum."""
    from megatron_pr2.predictor.state import LOSS_SUM, PredictorState

    state = PredictorState(PredictorConfig(), topk=2)
    for i in range(1000):
        state._add_on_device(LOSS_SUM, torch.tensor(float(i)))
    assert max(len(terms) for terms in state._device_terms.values()) < 256
    assert state.take_counters()[LOSS_SUM] == sum(range(1000))
    assert state.take_counters()[LOSS_SUM] == 0.0  # taken: the next call starts from zero


def test_offset_clip_bounds_the_offset_by_each_tokens_logit_spread():
    """``offset_clip``: each offset entry within clip x std(old logits) of its token, where it
    picks routes; 0 leaves the offset as the predictor gives it."""
    from megatron_pr2.predictor.module import EvolutionPredictor
    from megatron_pr2.predictor.state import PredictorState

    g = torch.Generator().manual_seed(0)
    predictor = EvolutionPredictor(4, 6, sequence_parallel=False)
    predictor.weight.data = torch.randn(6, 4, generator=g) * 3.0
    hidden = torch.randn(10, 4, generator=g)
    logits = torch.randn(10, 6, generator=g) * torch.linspace(0.1, 2.0, 10)[:, None]
    keys = MicrobatchKeys(token_keys(torch.zeros(10, dtype=torch.long), torch.arange(10)))
    raw = predictor(hidden).detach()

    plain = PredictorState(PredictorConfig(cache_keep_fraction=1.0), topk=2)
    assert torch.equal(plain.record(predictor, hidden, logits, keys).detach(), raw)

    clipped = PredictorState(PredictorConfig(cache_keep_fraction=1.0, offset_clip=0.5), topk=2)
    offset = clipped.record(predictor, hidden, logits, keys).detach()
    bound = 0.5 * logits.std(dim=-1, keepdim=True)
    assert bool((offset.abs() <= bound + 1e-6).all())
    inside = raw.abs() <= bound
    assert bool(inside.any()) and bool((~inside).any())  # both cases occur
    assert torch.equal(offset[inside], raw[inside])
    assert torch.allclose(offset[~inside], (raw.sign() * bound.expand_as(raw))[~inside])
    with pytest.raises(ValueError, match="offset_clip"):
        PredictorConfig(offset_clip=-1.0)
