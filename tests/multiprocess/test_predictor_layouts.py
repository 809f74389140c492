"""PR2 predictor gradients are the same in every layout (megatron DDP + finalize_model_grads),
and predictor weights with their optimizer group survive a save in one layout and a load in
another."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_pr2.models.gpt import lm_forward_backward
from megatron_pr2.models.training import (
    load_checkpoint,
    save_checkpoint,
    setup_training,
    train_step,
)
from megatron_pr2.predictor.optim import predictor_groups
from tests.support import replay_harness as h
from tests.support.dist import Layout, init_layout
from tests.unit.test_predictor import build

REFERENCE = Layout()  # world 2 -> DP2 on identical data, which averages to the world-1 gradient


def _set_predictors(session) -> None:
    with torch.no_grad():
        for layer in session.layers:
            weight = session._routers[layer].evolution_predictor.weight
            g = torch.Generator().manual_seed(100 + layer)
            weight.copy_(0.05 * torch.randn(weight.shape, generator=g))


def _predictor_grads(
    layout: Layout, recompute: str, checkpoint: str, save: bool = False
) -> dict[int, torch.Tensor]:
    """Predictor main grads after one replayed pass. Weights come from one checkpoint saved by
    the reference layout: initialisation order (hence weights) differs between PP layouts."""
    init_layout(layout)
    chunks, session = build("pr2", recompute=recompute)
    _set_predictors(session)
    setup = setup_training(chunks, lr=1e-3, predictor_lr_mult=10.0)
    if save:
        save_checkpoint(setup, checkpoint)
    else:
        load_checkpoint(setup, checkpoint, load_optimizer=False)
    batches = h.make_batches(4)
    with torch.no_grad(), session.recording() as record:
        lm_forward_backward(setup.chunks, batches, forward_only=True)
    for chunk in setup.chunks:
        chunk.zero_grad_buffer()
    with session.replaying(record.routes, predictor_loss=True):
        lm_forward_backward(setup.chunks, batches)
    local = {
        layer: session._routers[layer].evolution_predictor.weight.main_grad.detach().clone()
        for layer in session.layers
    }
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict[int, torch.Tensor] = {}
    for part in gathered:
        for layer, grad in part.items():
            if layer in merged:  # replicas (TP/DP) must agree
                torch.testing.assert_close(merged[layer], grad, rtol=0, atol=1e-7)
            merged[layer] = grad
    return merged


def _check(rank: int, world: int, layouts: list[tuple[Layout, str]], checkpoint: str) -> None:
    reference = _predictor_grads(REFERENCE, "off", checkpoint, save=True)
    assert sorted(reference) == [1, 2, 3, 4]
    assert all(g.abs().sum() > 0 for g in reference.values())
    for layout, recompute in layouts:
        grads = _predictor_grads(layout, recompute, checkpoint)
        assert sorted(grads) == sorted(reference), layout.name
        for layer in reference:
            torch.testing.assert_close(
                grads[layer],
                reference[layer],
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, label=f"{layout.name}/{recompute} layer {layer}": f"{label}: {m}",
            )


@pytest.mark.slow
def test_predictor_gradients_match_across_tp_sp_pp_and_recompute(run_dist, tmp_path):
    run_dist(
        _check,
        2,
        [
            (Layout(tp=2), "off"),
            (Layout(pp=2), "off"),
            (Layout(pp=2), "full"),
            (Layout(ep=2), "off"),
        ],
        str(tmp_path / "reference"),
    )


def _reshard(rank: int, world: int, directory: str) -> None:
    init_layout(Layout(pp=2))
    chunks, session = build("pr2")
    _set_predictors(session)
    setup = setup_training(chunks, lr=1e-3, predictor_lr_mult=10.0)
    batches = h.make_batches(2)
    with torch.no_grad(), session.recording() as record:
        lm_forward_backward(setup.chunks, batches, forward_only=True)
    with session.replaying(record.routes, predictor_loss=True):  # one step: Adam state exists
        train_step(setup, batches, predictor_active=True)
    save_checkpoint(setup, directory)
    saved = {
        layer: session._routers[layer].evolution_predictor.weight.detach().clone()
        for layer in session.layers
    }
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, saved)
    expected = {k: v for part in gathered for k, v in part.items()}

    init_layout(Layout(tp=2))
    chunks, session = build("pr2", seed=77)
    setup = setup_training(chunks, lr=1e-3, predictor_lr_mult=10.0)
    load_checkpoint(setup, directory)
    for layer in session.layers:
        torch.testing.assert_close(
            session._routers[layer].evolution_predictor.weight, expected[layer], rtol=0, atol=0
        )
    groups = predictor_groups(setup.optimizer)
    assert len(groups) == 1 and len(groups[0]["params"]) == 4
    assert groups[0]["lr"] == pytest.approx(1e-2)
    state = setup.optimizer.optimizer.state
    assert all(state[p]["exp_avg"].abs().sum() > 0 for p in groups[0]["params"])


@pytest.mark.slow
def test_predictor_weights_and_group_survive_pp2_save_tp2_load(run_dist, tmp_path):
    run_dist(_reshard, 2, str(tmp_path / "ckpt"))
