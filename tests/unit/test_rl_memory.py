"""The trainer's memory settings: activation recompute changes nothing, bf16 keeps fp32 main
params, the distributed optimizer trains."""

from __future__ import annotations

import math

import torch

from megatron_pr2.rl.config import load_config
from megatron_pr2.rl.trainer import train, training_steps
from tests.unit.test_rl_trainer import TINY, tiny_overrides


def _values(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("timing/")} for m in history]


def test_activation_checkpointing_gives_the_same_run(world1, tmp_path):
    """Full recompute replays each layer's routes in the backward: every metric (losses,
    ratios, replay and predictor metrics) equals the run without it."""
    runs = []
    for recompute in (False, True):
        overrides = tiny_overrides("pr2", str(tmp_path / str(recompute)))
        runs.append(
            train(load_config(TINY, [*overrides, f"policy.activation_checkpointing={recompute}"]))
        )
    assert _values(runs[0]) == _values(runs[1])


def test_bf16_with_distributed_optimizer_keeps_fp32_main_params(world1, tmp_path):
    overrides = [
        *tiny_overrides("r2", str(tmp_path)),
        "policy.precision=bfloat16",
        "policy.use_distributed_optimizer=true",
        "policy.activation_checkpointing=true",
    ]
    steps = training_steps(load_config(TINY, overrides))
    first = next(steps)
    assert all(math.isfinite(v) for v in first.values())
    # peek at the trainer's worker through the generator's frame (no public handle needed)
    worker = steps.gi_frame.f_locals["worker"]
    # every matrix (linears, experts, router, embeddings) is bf16; megatron's torch-norm
    # fallback on CPU keeps its 1-D scales in fp32
    matrices = {n: p.dtype for m in worker.modules for n, p in m.named_parameters() if p.dim() > 1}
    assert set(matrices.values()) == {torch.bfloat16}, matrices
    optimizer = worker.setup.optimizer
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    main = [p for o in inner for g in o.optimizer.param_groups for p in g["params"]]
    assert main and {p.dtype for p in main} == {torch.float32}
    assert type(inner[0]).__name__ == "DistributedOptimizer"
    assert next(steps)["step"] == 2
