"""Layout parity: for r2, r3 (routes from vLLM-format payloads through the alignment map) and pr2 the same batch gives the same losses, router gradients and
predictor gradients in every parallel layout, with activation recompute off and on.

Weights come from one dist checkpoint saved by the reference layout (megatron's CPU
initialisation order differs between pipeline layouts). The reference is the data-parallel
layout of the same world size on identical data, which averages to the world-1 gradient.
Gradients are megatron DDP ``main_grad`` after ``finalize_model_grads``; with the distributed
optimizer (whose grad buffer is reduce-scattered) the weights after one optimizer step are
compared instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, lm_forward_backward, moe_transformer_config
from megatron_pr2.models.training import load_checkpoint, save_checkpoint, setup_training
from megatron_pr2.replay.session import ReplaySession
from megatron_pr2.routes.payload import RouteSpec
from tests.support import engine_routes as er
from tests.support import replay_harness as h
from tests.support.dist import Layout, init_layout

MODES = ("r2", "r3", "pr2")
RECOMPUTES = ("off", "full")


@dataclass(frozen=True)
class Case:
    layout: Layout
    dispatcher: str = "alltoall"
    distributed_optimizer: bool = False

    @property
    def name(self) -> str:
        extra = f"/{self.dispatcher}" + ("/distopt" if self.distributed_optimizer else "")
        return self.layout.name + extra


def _gather_by_layer(local: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    parts: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[int, torch.Tensor] = {}
    for part in parts:
        for layer, value in part.items():
            if layer in merged:  # replicas must agree exactly enough
                torch.testing.assert_close(value, merged[layer], rtol=1e-5, atol=1e-7)
            merged[layer] = value
    return merged


def _run(
    case: Case, mode: str, recompute: str, checkpoint: str, save: bool = False, step: bool = False
) -> dict:
    """Losses and per-layer router / predictor gradients (``step``: weights after one step)."""
    init_layout(case.layout)
    torch.manual_seed(5)
    config = moe_transformer_config(
        h.SHAPE, moe_token_dispatcher_type=case.dispatcher, **h.RECOMPUTE[recompute]
    )
    replay = RouterReplayConfig(mode=mode, predictor=PredictorConfig(cache_keep_fraction=1.0))
    chunks = build_model_chunks(config, h.SHAPE.vocab_size, h.SEQ, replay_config=replay)
    session = ReplaySession(chunks)
    routers = {layer: session._routers[layer] for layer in session.layers}
    setup = setup_training(
        chunks,
        lr=1e-3,
        predictor_lr_mult=10.0,
        use_distributed_optimizer=case.distributed_optimizer,
    )
    if save:
        with torch.no_grad():
            for layer, router in routers.items():
                g = torch.Generator().manual_seed(100 + layer)
                predictor = router.evolution_predictor
                if predictor is not None:
                    predictor.weight.copy_(0.05 * torch.randn(predictor.weight.shape, generator=g))
        save_checkpoint(setup, checkpoint)
    else:
        load_checkpoint(setup, checkpoint, load_optimizer=False)

    batches = h.make_batches(4)
    if mode == "r3":  # vLLM-format payloads, aligned to this rank (SP slice, PP layers)
        spec = RouteSpec.from_config(config)
        payloads = [er.vllm_payload(sid, h.SEQ, spec) for sid in range(4 * h.MICRO_BATCH)]
        layouts = er.microbatch_layouts(4, h.MICRO_BATCH, h.SEQ)
        routes = er.session_routes(payloads, layouts, config, session.layers)
    else:
        with torch.no_grad(), session.recording() as record:
            lm_forward_backward(setup.chunks, batches, forward_only=True)
        routes = record.routes
    for chunk in setup.chunks:
        chunk.zero_grad_buffer()
    with session.replaying(routes, predictor_loss=mode == "pr2"):
        losses = lm_forward_backward(setup.chunks, batches)
    loss = torch.stack([d["lm_loss"] for d in losses]) if losses else None
    loss_parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(loss_parts, loss)

    def weights_or_grads(param) -> torch.Tensor:
        return (param.detach() if step else param.main_grad).clone()

    if step:
        setup.optimizer.step()
    result = {
        "loss": next(part for part in loss_parts if part is not None),
        "router": _gather_by_layer({k: weights_or_grads(r.weight) for k, r in routers.items()}),
    }
    if mode == "pr2":
        result["predictor"] = _gather_by_layer(
            {k: weights_or_grads(r.evolution_predictor.weight) for k, r in routers.items()}
        )
    return result


def _compare(reference: dict, got: dict, label: str) -> None:
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=1e-6, msg=label)
    for key in ("router", "predictor"):
        if key not in reference:
            continue
        assert sorted(got[key]) == sorted(reference[key]), f"{label}: {key} layers"
        for layer, value in reference[key].items():
            torch.testing.assert_close(
                got[key][layer],
                value,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, layer=layer, key=key: f"{label} {key} layer {layer}: {m}",
            )


def _matrix(rank: int, world: int, cases: list[Case], checkpoint: str) -> None:
    reference_case = Case(Layout())
    for mode in MODES:
        ckpt = f"{checkpoint}-{mode}"
        for recompute in RECOMPUTES:
            reference = _run(reference_case, mode, recompute, ckpt, save=recompute == "off")
            for case in cases:
                label = f"{case.name} {mode} recompute={recompute}"
                if case.distributed_optimizer:
                    # Its grad buffer is reduce-scattered: compare weights after one step.
                    stepped = _run(reference_case, mode, recompute, ckpt, step=True)
                    got = _run(case, mode, recompute, ckpt, step=True)
                    _compare(stepped, got, label)
                else:
                    _compare(reference, _run(case, mode, recompute, ckpt), label)


WORLD2 = [
    Case(Layout(ep=2)),
    Case(Layout(ep=2), dispatcher="allgather"),
    Case(Layout(tp=2)),
    Case(Layout(pp=2)),
    Case(Layout(pp=2, vp=2)),
    Case(Layout(), distributed_optimizer=True),  # DP2 with the distributed optimizer
]
WORLD4 = [
    Case(Layout(tp=2, ep=2)),  # expert TP defaults to TP: ETP2
    Case(Layout(pp=2, ep=2)),
]


@pytest.mark.slow
def test_parity_world2_ep_tp_sp_pp_vpp(run_dist, tmp_path):
    run_dist(_matrix, 2, WORLD2, str(tmp_path / "ref"))


@pytest.mark.slow
def test_parity_world4_tp2ep2_pp2ep2(run_dist, tmp_path):
    run_dist(_matrix, 4, WORLD4, str(tmp_path / "ref"))
