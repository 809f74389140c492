"""The replay demo: a tiny MoE GPT on megatron-core records R2 routes in a forward-only pass,
takes optimizer steps while replaying them, and prints the replay metrics per step.

It shows router drift directly: at step 0 the replayed routes equal the live router's choice
(zero-deviation ratio 1.0); as the router weights move, the live top-k drifts away from the
frozen routes while replay keeps the experts fixed.
"""

from __future__ import annotations

import argparse

import torch

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import (
    LMBatch,
    TinyMoEShape,
    build_model_chunks,
    lm_forward_backward,
    moe_transformer_config,
)
from megatron_pr2.replay.session import ReplaySession


def run_demo(steps: int = 4, microbatches: int = 4, lr: float = 5e-3, seed: int = 0) -> list[dict]:
    """Run on an initialised megatron parallel state (any layout); returns per-step metrics."""
    shape = TinyMoEShape()
    torch.manual_seed(seed)
    config = moe_transformer_config(shape)
    chunks = build_model_chunks(
        config, shape.vocab_size, shape.max_sequence_length, RouterReplayConfig(mode="r2")
    )
    session = ReplaySession(chunks)
    params = [p for chunk in chunks for p in chunk.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = [LMBatch.random(2, 32, shape.vocab_size, generator) for _ in range(microbatches)]

    with torch.no_grad(), session.recording() as record:  # the old-log-prob pass
        lm_forward_backward(chunks, batches, forward_only=True)
    history = []
    for _ in range(steps):  # off-policy mini-steps on the same batch, routes replayed
        optimizer.zero_grad(set_to_none=True)
        with session.replaying(record.routes):
            losses = lm_forward_backward(chunks, batches)
        optimizer.step()
        metrics = session.metrics()
        if losses:
            metrics["train/loss"] = float(sum(d["lm_loss"] for d in losses))
        history.append(metrics)
    return history


def format_step(step: int, metrics: dict) -> str:
    m = metrics
    return (
        f"mini-step {step}: loss {m.get('train/loss', float('nan')):.4f}  "
        f"replay_agreement {m['router_replay/replay_agreement']:.4f}  "
        f"zero_deviation {m['router_replay/zero_deviation_ratio']:.4f}  "
        f"deviation 0/1/2/>=3 = "
        + "/".join(f"{m[f'router_replay/topk_deviation_{k}']:.3f}" for k in ("0", "1", "2", "ge3"))
        + f"  fallback {int(m['router_replay/fallback_tokens'])}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args(argv)
    for step, metrics in enumerate(run_demo(args.steps, args.microbatches, args.lr)):
        print(format_step(step, metrics), flush=True)
