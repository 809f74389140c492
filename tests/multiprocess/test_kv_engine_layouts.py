"""The KV-cached engine in the parallel layouts it serves (EP2 over DP2, TP2 without and with
sequence parallelism in the trainer): greedy rollouts equal the recompute engine's in the same
layout, each rank's routes of real tokens equal the recompute engine's (under SP: this rank's
sequence slice), and sampled rollouts agree over ranks."""

from __future__ import annotations

import pytest
import torch

from tests.support.dist import Layout, init_layout

pytestmark = pytest.mark.slow

VOCAB, MAX_SEQ = 40, 32
PROMPT_LENGTHS = (3, 6, 4, 5)
MAX_NEW, MBS = 6, 2


def _check_layout(layout: Layout, sequence_parallel: bool = False) -> None:
    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import TinyMoEShape, build_model_chunks, moe_transformer_config
    from megatron_pr2.rl.engine import RolloutEngine, bf16_engine_config
    from megatron_pr2.rl.kv_engine import KVCacheEngine

    init_layout(layout)
    shape = TinyMoEShape(num_layers=2, vocab_size=VOCAB, max_sequence_length=MAX_SEQ)
    config = moe_transformer_config(shape, sequence_parallel=sequence_parallel)
    trainer = build_model_chunks(config, VOCAB, MAX_SEQ, RouterReplayConfig(mode="r3"))
    kw = dict(pad_id=0, eos_id=1)
    old = RolloutEngine(bf16_engine_config(config), VOCAB, MAX_SEQ, **kw)
    new = KVCacheEngine(bf16_engine_config(config), VOCAB, MAX_SEQ, **kw)
    assert new.uses_kv_cache
    for engine in (old, new):
        engine.refresh(trainer, include_predictor=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]

    a = old.generate(prompts, MAX_NEW, top_p=1e-6, micro_batch_size=MBS)  # greedy
    b = new.generate(prompts, MAX_NEW, top_k=1, micro_batch_size=MBS)
    assert torch.equal(a.tokens, b.tokens), layout.name
    assert torch.allclose(a.generation_logprobs, b.generation_logprobs, atol=1e-5)
    assert a.seq_length % (2 if sequence_parallel else 1) == 0
    local = a.seq_length // (2 if sequence_parallel else 1)  # this rank's positions
    first = torch.distributed.get_rank() * local if sequence_parallel else 0
    for layer in a.routes:
        for mb, (x, y) in enumerate(zip(a.routes[layer], b.routes[layer])):
            assert x.shape == y.shape == (local * MBS, x.shape[1]), layout.name
            x, y = x.long().view(local, MBS, -1), y.long().view(local, MBS, -1)
            for j in range(MBS):
                n = max(0, min(local, int(a.lengths[mb * MBS + j]) - 1 - first))
                assert torch.equal(x[:n, j].sort(-1).values, y[:n, j].sort(-1).values)

    sampled = new.generate(prompts, MAX_NEW, generator=torch.Generator().manual_seed(1))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sampled.tokens.tolist())
    assert all(t == gathered[0] for t in gathered), layout.name


def _run(rank: int, world: int) -> None:
    for layout in (Layout(ep=2), Layout(tp=2)):
        _check_layout(layout)
    _check_layout(Layout(tp=2), sequence_parallel=True)


def test_kv_engine_under_ep2_and_tp2_with_and_without_sp(run_dist):
    run_dist(_run, 2)
