"""The KV-cached rollout engine on real megatron-core (world 1): the same rollouts as the
recompute engine and as one prompt at a time, one token per step for live rows only, and
routes the trainer can replay."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.models.gpt import TinyMoEShape, build_model_chunks, moe_transformer_config
from megatron_pr2.rl import kv_engine
from megatron_pr2.rl.backend import GenerationBackend, build_generation_backend
from megatron_pr2.rl.config import GenerationConfig
from megatron_pr2.rl.engine import RolloutEngine, bf16_engine_config
from megatron_pr2.rl.kv_engine import KVCacheEngine
from megatron_pr2.rl.worker import PolicyWorker, RLBatch

VOCAB, MAX_SEQ, PAD, EOS = 40, 40, 0, 1
SHAPE = TinyMoEShape(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    vocab_size=VOCAB,
    max_sequence_length=MAX_SEQ,
)
PROMPT_LENGTHS = (3, 7, 5, 9, 4, 6)
MAX_NEW, MBS = 10, 2
# The recompute engine's nucleus keeps only the top token. An exact tie in the bf16 logits would
# break differently (its sort order vs argmax's first index); these fixtures have none there.
GREEDY_OLD = dict(top_p=1e-6)
PREDICTOR = PredictorConfig(cache_keep_fraction=1.0)


def trainer_chunks(mode: str = "r3"):
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    replay = RouterReplayConfig(mode=mode, predictor=PREDICTOR, metrics_token_stride=1)
    return build_model_chunks(moe_transformer_config(SHAPE), VOCAB, MAX_SEQ, replay), replay


def engines(trainer, engine_mode: str = "r3", eos_id: int = EOS, **kw):
    config = bf16_engine_config(moe_transformer_config(SHAPE))
    common = dict(pad_id=PAD, eos_id=eos_id, mode=engine_mode, predictor=PREDICTOR, **kw)
    old = RolloutEngine(config, VOCAB, MAX_SEQ, **common)
    new = KVCacheEngine(config, VOCAB, MAX_SEQ, **common)
    for engine in (old, new):
        engine.refresh(trainer, include_predictor=engine.applies_predictor)
    return old, new


def prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_same_rollout(a, b) -> None:
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.prompt_lengths, b.prompt_lengths)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.generation_logprobs, b.generation_logprobs, atol=1e-5, rtol=0)


def real_routes(rollout, layer: int) -> list[torch.Tensor]:
    """Per sample, the routes of its forwarded tokens (all but the last), experts sorted."""
    seq, mbs = rollout.seq_length, rollout.micro_batch_size
    out = []
    for mb, routes in enumerate(rollout.routes[layer]):
        per = routes.long().view(seq, mbs, -1)
        for j in range(mbs):
            n = int(rollout.lengths[mb * mbs + j])
            out.append(per[: n - 1, j].sort(dim=-1).values)
    return out


def common_eos(trainer) -> int:
    """A token the greedy model emits mid-response in some rows: as eos it ends rows at
    different steps (the untrained model never picks the real eos)."""
    _, new = engines(trainer, eos_id=VOCAB - 1, sample_vocab_size=VOCAB - 1)
    rollout = new.generate(prompts(), MAX_NEW, top_k=1, return_routes=False)
    counts = torch.bincount(torch.cat([torch.tensor(r[:-2]) for r in rollout.responses()]))
    return int(counts.argmax())


@pytest.mark.parametrize("engine_mode", ["r3", "pr2_r3"])
def test_kv_engine_matches_recompute_engine_greedy(world1, engine_mode):
    trainer, _ = trainer_chunks("pr2" if engine_mode == "pr2_r3" else "r3")
    if engine_mode == "pr2_r3":  # a non-zero predictor, so sampling depends on it
        for name, p in trainer[0].named_parameters():
            if "evolution_predictor" in name:
                p.data.normal_(0, 0.5)
    old, new = engines(trainer, engine_mode)
    a = old.generate(prompts(), MAX_NEW, micro_batch_size=MBS, **GREEDY_OLD)
    b = new.generate(prompts(), MAX_NEW, micro_batch_size=MBS, top_k=1)
    assert_same_rollout(a, b)
    assert sorted(a.routes) == sorted(b.routes) == [1, 2]
    for layer in a.routes:
        assert len(b.routes[layer]) == len(PROMPT_LENGTHS) // MBS
        for x, y in zip(a.routes[layer], b.routes[layer]):
            assert x.shape == y.shape
            assert y.min() >= 0 and y.max() < SHAPE.num_moe_experts
            assert bool((y[:, 0] != y[:, 1]).all())  # padding and last tokens: legal rows too
        for x, y in zip(real_routes(a, layer), real_routes(b, layer)):
            assert torch.equal(x, y)


def test_batched_generation_equals_each_prompt_alone(world1):
    trainer, _ = trainer_chunks()
    _, new = engines(trainer, eos_id=common_eos(trainer))
    batched = new.generate(prompts(), MAX_NEW, top_k=1)
    finished_early = batched.lengths < batched.prompt_lengths + MAX_NEW
    assert 0 < int(finished_early.sum()) < len(PROMPT_LENGTHS)  # rows leave at different steps
    for i, prompt in enumerate(prompts()):
        alone = new.generate([prompt], MAX_NEW, top_k=1)
        n = int(alone.lengths[0])
        assert int(batched.lengths[i]) == n
        assert torch.equal(batched.tokens[i, :n], alone.tokens[0, :n])
        assert torch.allclose(
            batched.generation_logprobs[i, :n], alone.generation_logprobs[0, :n], atol=1e-5
        )
        for layer in alone.routes:
            assert torch.equal(real_routes(batched, layer)[i], real_routes(alone, layer)[0])


def test_one_token_per_step_for_live_rows_only(world1):
    trainer, _ = trainer_chunks()
    _, new = engines(trainer, eos_id=common_eos(trainer))
    calls: list[tuple[int, int]] = []
    hook = new.chunks[0].register_forward_pre_hook(
        lambda _m, args: calls.append(tuple(args[0].shape))
    )
    try:
        rollout = new.generate(prompts(), MAX_NEW, top_k=1, return_routes=False)
    finally:
        hook.remove()
    batch = len(PROMPT_LENGTHS)
    assert calls[0] == (batch, min(PROMPT_LENGTHS))  # one prefill of the shared prefix
    steps = calls[1:]
    assert all(width == 1 for _, width in steps)
    rows = [r for r, _ in steps]
    assert rows == sorted(rows, reverse=True)  # the batch only shrinks
    # Finished rows left (the last steps forward fewer rows than the batch), and the steps
    # stop at the longest sample's last forwarded token (its final token is never forwarded).
    assert rows[-1] < batch
    assert len(steps) == int(rollout.lengths.max()) - 1 - min(PROMPT_LENGTHS)
    # Each step forwards exactly the rows still generating (or still reading their prompt).
    for t, (live, _) in enumerate(steps, start=min(PROMPT_LENGTHS)):
        assert live == int((rollout.lengths > t + 1).sum())


def test_sampling_knobs_and_generator_reproducibility(world1):
    trainer, _ = trainer_chunks()
    _, new = engines(trainer, sample_vocab_size=VOCAB - 4)
    run = dict(temperature=0.8, top_p=0.9, top_k=5, micro_batch_size=MBS)
    a = new.generate(prompts(), MAX_NEW, generator=torch.Generator().manual_seed(1), **run)
    b = new.generate(prompts(), MAX_NEW, generator=torch.Generator().manual_seed(1), **run)
    c = new.generate(prompts(), MAX_NEW, generator=torch.Generator().manual_seed(2), **run)
    assert_same_rollout(a, b)
    assert not torch.equal(a.tokens, c.tokens)
    for i, response in enumerate(a.responses()):
        assert all(t < VOCAB - 4 for t in response)
        p = int(a.prompt_lengths[i])
        assert bool((a.generation_logprobs[i, p : int(a.lengths[i])] < 0).all())
    # Each sampled token was among the top 5 of the engine's own next-token logits.
    positions = torch.arange(a.seq_length).unsqueeze(0).expand_as(a.tokens)
    with torch.no_grad():
        logits = new.chunks[0](a.tokens, positions, attention_mask=None).float()
    top5 = logits[:, :, : VOCAB - 4].topk(5, dim=-1).indices
    mask = a.response_mask[:, 1:].bool()
    picked = (top5[:, :-1] == a.tokens[:, 1:, None]).any(-1)
    assert bool(picked[mask].all())
    # The log-probs are of the raw full-vocabulary distribution (vLLM's raw_logprobs).
    raw = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, a.tokens[:, 1:, None]).squeeze(2)
    assert torch.allclose(raw[mask], a.generation_logprobs[:, 1:][mask], atol=1e-5)


def test_worker_replays_kv_engine_routes(world1):
    trainer, replay = trainer_chunks("r3")
    worker = PolicyWorker(trainer, replay, lr=1e-3, micro_batch_size=MBS)
    _, new = engines(worker.modules)
    rollout = new.generate(
        prompts(), MAX_NEW, generator=torch.Generator().manual_seed(0), micro_batch_size=MBS
    )
    advantages = torch.linspace(-1, 1, len(PROMPT_LENGTHS))
    batch = RLBatch.from_rollout(rollout, advantages, pad_id=PAD)
    prev = worker.get_logprobs(batch, rollout.routes)
    mask = rollout.response_mask.bool()
    # Measured: every token the engine forwarded, i.e. all but padding and each sample's last
    # token (no engine forwards it; its route is synthetic and would read as a deviation).
    forwarded = int(rollout.lengths.sum()) - len(rollout.lengths)
    prefix = "logprobs/router_replay/tokens/layer_"
    per_layer = [v for k, v in worker.logprob_metrics.items() if k.startswith(prefix)]
    assert per_layer and all(v == forwarded for v in per_layer)
    # fp32 trainer under the bf16 engine's routes vs the engine's own log-probs: the bf16 gap.
    assert (prev[mask] - rollout.generation_logprobs[mask]).abs().max() < 0.1


def test_generation_backend_factory(world1):
    trainer, _ = trainer_chunks()
    config = bf16_engine_config(moe_transformer_config(SHAPE))
    kw = dict(pad_id=PAD, eos_id=EOS, mode="r3", predictor=PREDICTOR)
    engine = build_generation_backend(GenerationConfig(top_k=1), config, VOCAB, MAX_SEQ, **kw)
    assert isinstance(engine, KVCacheEngine) and isinstance(engine, GenerationBackend)
    engine.refresh(trainer, include_predictor=False)
    old, _ = engines(trainer)
    a = old.generate(prompts(), MAX_NEW, return_routes=False, **GREEDY_OLD)
    assert_same_rollout(a, engine.generate(prompts(), MAX_NEW, return_routes=False))  # top_k=1
    with pytest.raises(ValueError, match="vllm"):
        build_generation_backend(GenerationConfig(backend="vllm"), config, VOCAB, MAX_SEQ, **kw)
    with pytest.raises(ValueError, match="max_sequence_length"):
        engine.generate([[2] * 35], 10)


def test_finished_rows_ride_along_until_compaction_without_changing_results(world1, monkeypatch):
    """With more than 8 cache rows the cache is compacted once an eighth of them finished:
    finished rows still in the cache are fed padding and must change no one's result (the
    reference compacts at every finish)."""
    trainer, _ = trainer_chunks()
    _, new = engines(trainer, eos_id=common_eos(trainer))
    many = prompts(PROMPT_LENGTHS * 3, seed=1)  # 18 rows
    calls: list[int] = []
    hook = new.chunks[0].register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    try:
        b = new.generate(many, MAX_NEW, top_k=1, micro_batch_size=MBS)
    finally:
        hook.remove()
    monkeypatch.setattr(kv_engine, "_COMPACT_FRACTION", 0.0)
    a = new.generate(many, MAX_NEW, top_k=1, micro_batch_size=MBS)
    assert_same_rollout(a, b)
    for layer in a.routes:
        for x, y in zip(real_routes(a, layer), real_routes(b, layer)):
            assert torch.equal(x, y)
    steps = calls[1:]
    first = min(PROMPT_LENGTHS)
    live = [int((b.lengths > t + 1).sum()) for t in range(first, first + len(steps))]
    assert all(rows >= n for rows, n in zip(steps, live))  # never drops a live row
    assert any(rows > n for rows, n in zip(steps, live))  # finished rows rode along a while
    assert steps[-1] < len(many)  # and were compacted away
