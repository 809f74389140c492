"""The supervised LM loss megatron's schedule reports per micro-batch (warm start's sft/loss)."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import (
    LMBatch,
    TinyMoEShape,
    build_model_chunks,
    lm_forward_backward,
    moe_transformer_config,
)

VOCAB, SEQ = 16, 12
SHAPE = TinyMoEShape(vocab_size=VOCAB, max_sequence_length=SEQ)


def test_reported_loss_is_each_micro_batch_mean_whatever_their_count(world1):
    """megatron divides the returned loss in place by the micro-batch count; the reported value
    is still the micro-batch's own masked mean (it was that share: 1/8 of it at 8 micro-batches)."""
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    chunks = build_model_chunks(
        moe_transformer_config(SHAPE), VOCAB, SEQ, RouterReplayConfig(mode="none")
    )
    tokens = torch.randint(3, VOCAB, (8, SEQ))
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(8, SEQ)
    mask[:, 6:] = 1.0
    batches = [LMBatch(tokens[i : i + 1], labels[i : i + 1], mask[i : i + 1]) for i in range(8)]
    alone = [lm_forward_backward(chunks, [b], forward_only=True)[0]["lm_loss"] for b in batches]
    together = [o["lm_loss"] for o in lm_forward_backward(chunks, batches, forward_only=True)]
    torch.testing.assert_close(torch.stack(together), torch.stack(alone))
    # and the value is the masked mean NLL of the labels (about ln(vocab) for a fresh model)
    assert (
        0.7 * torch.log(torch.tensor(float(VOCAB)))
        < torch.stack(alone).mean()
        < 1.3 * (torch.log(torch.tensor(float(VOCAB))))
    )
