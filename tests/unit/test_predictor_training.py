"""PR2 with megatron's DDP, optimizer and dist checkpoints (world 1): the predictor's own param
group, freezing on steps without its loss, exact resume, base checkpoints, export."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.models.gpt import lm_forward_backward
from megatron_pr2.models.training import (
    export_state_dict,
    load_checkpoint,
    save_checkpoint,
    setup_training,
    train_step,
)
from megatron_pr2.predictor.optim import predictor_groups
from tests.unit.test_predictor import build, h

LR, MULT, KAPPA = 1e-3, 10.0, 2


def predictor_weights(session):
    return [p.detach().clone() for p in session.predictor_parameters()]


def run_rollouts(setup, session, batches, rollouts):
    """Per rollout batch: record pr2 routes, then KAPPA mini-steps replaying them."""
    losses, weights = [], []
    for _ in range(rollouts):
        with torch.no_grad(), session.recording() as record:
            lm_forward_backward(setup.chunks, batches, forward_only=True)
        for step in range(KAPPA):
            with session.replaying(record.routes, predictor_loss=step >= 1):
                out, _ = train_step(setup, batches, predictor_active=step >= 1)
            losses.append(torch.stack([d["lm_loss"] for d in out]))
            weights.append(predictor_weights(session))
    return losses, weights


def test_predictor_has_its_own_group_with_lr_multiplier_and_no_weight_decay(world1):
    chunks, _ = build("pr2")
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT, weight_decay=0.1)
    groups = predictor_groups(setup.optimizer)
    assert len(groups) == 1
    assert len(groups[0]["params"]) == h.SHAPE.num_layers
    assert groups[0]["lr"] == pytest.approx(LR * MULT)
    assert groups[0]["weight_decay"] == 0.0
    others = [g for g in setup.optimizer.param_groups if g not in groups]
    assert all(g["lr"] == pytest.approx(LR) for g in others)


def test_predictor_frozen_on_steps_without_its_loss(world1):
    chunks, session = build("pr2")
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT, weight_decay=0.1)
    _, weights = run_rollouts(setup, session, h.make_batches(2), rollouts=2)
    # mini-steps: [r0s0, r0s1, r1s0, r1s1]; s0 has no predictor loss.
    assert all(w.abs().sum() == 0 for w in weights[0])  # untouched before its first loss
    assert all(w.abs().sum() > 0 for w in weights[1])
    for before, after in zip(weights[1], weights[2]):  # Adam moments exist, still no movement
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(weights[2], weights[3]))


def test_resume_mid_run_reproduces_the_uninterrupted_run_exactly(world1, tmp_path):
    batches = h.make_batches(2)
    chunks, session = build("pr2")
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT)
    full_losses, full_weights = run_rollouts(setup, session, batches, rollouts=3)

    chunks, session = build("pr2")
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT)
    run_rollouts(setup, session, batches, rollouts=1)
    save_checkpoint(setup, tmp_path / "ckpt")

    chunks, session = build("pr2", seed=77)  # different init: everything must come from disk
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT)
    load_checkpoint(setup, tmp_path / "ckpt")
    groups = predictor_groups(setup.optimizer)
    assert len(groups) == 1 and len(groups[0]["params"]) == h.SHAPE.num_layers
    assert groups[0]["lr"] == pytest.approx(LR * MULT)
    resumed_losses, resumed_weights = run_rollouts(setup, session, batches, rollouts=2)

    for full, resumed in zip(full_losses[KAPPA:], resumed_losses):
        assert torch.equal(full, resumed)
    for full, resumed in zip(full_weights[KAPPA:], resumed_weights):
        for a, b in zip(full, resumed):
            assert torch.equal(a, b)


def test_base_checkpoint_without_predictor_loads_with_zero_predictor_and_a_warning(
    world1, tmp_path
):
    chunks, _ = build("r2")
    base = setup_training(chunks, lr=LR, predictor_lr_mult=MULT)
    save_checkpoint(base, tmp_path / "base")

    chunks, session = build("pr2", seed=77)
    setup = setup_training(chunks, lr=LR, predictor_lr_mult=MULT)
    with pytest.warns(UserWarning, match="has no predictor weights"):
        load_checkpoint(setup, tmp_path / "base")
    assert all(w.abs().sum() == 0 for w in predictor_weights(session))
    base_state = export_state_dict(base.modules)
    loaded_state = export_state_dict(setup.modules)
    assert base_state.keys() == loaded_state.keys()
    for name in base_state:
        assert torch.equal(base_state[name], loaded_state[name]), name


def test_export_excludes_predictor_unless_asked(world1):
    chunks, _ = build("pr2")
    plain = export_state_dict(chunks)
    full = export_state_dict(chunks, include_predictor=True)
    predictor_keys = set(full) - set(plain)
    assert len(predictor_keys) == h.SHAPE.num_layers
    assert all("evolution_predictor" in k for k in predictor_keys)
