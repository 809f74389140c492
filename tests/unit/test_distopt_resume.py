"""PR2 with the recipes' defaults, bf16 params and megatron's distributed optimizer (torch Adam on
CPU: no TE/apex), and bf16 with the plain optimizer: a checkpoint saves and a resume continues
exactly like the uninterrupted run.

Before ``megatron_pr2.patch.distrib_optim`` every distributed-optimizer resume failed inside
megatron-core (a fresh optimizer's ``state_dict`` asserted one Adam step, then the
fully-reshardable loader raised ``KeyError: 'step'``), and once past those a shared ``step``
tensor broke Adam's bias correction after the resume. Before
``megatron_pr2.patch.float16_optim`` the plain bf16 optimizer could not save at all with fp32
params in the model (CPU norms, the predictor): ``Param id N does not match any model sharded
param``."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, moe_transformer_config
from megatron_pr2.models.training import (
    export_state_dict,
    load_checkpoint,
    save_checkpoint,
    setup_training,
)
from megatron_pr2.predictor.optim import predictor_groups
from megatron_pr2.replay.session import ReplaySession
from tests.support import replay_harness as h
from tests.unit.test_predictor_training import KAPPA, LR, MULT, run_rollouts

BF16 = dict(params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bf16=True)


def build_bf16(mode: str, seed: int):
    torch.manual_seed(seed)
    config = moe_transformer_config(h.SHAPE, **BF16)
    replay = RouterReplayConfig(
        mode=mode, predictor=PredictorConfig(cache_keep_fraction=1.0), metrics_token_stride=1
    )
    chunks = build_model_chunks(config, h.SHAPE.vocab_size, h.SEQ, replay_config=replay)
    return chunks, ReplaySession(chunks)


def setup_bf16(chunks, use_distributed: bool = True):
    return setup_training(
        chunks, lr=LR, predictor_lr_mult=MULT, use_distributed_optimizer=use_distributed
    )


def adam_steps(setup) -> set[float]:
    inner = setup.optimizer.chained_optimizers[0].optimizer
    return {float(state["step"]) for state in inner.state.values()}


@pytest.mark.parametrize(
    ("kind", "use_distributed"),
    [("DistributedOptimizer", True), ("Float16OptimizerWithFloat16Params", False)],
)
def test_pr2_bf16_resumes_exactly(world1, tmp_path, kind, use_distributed):
    batches = h.make_batches(2)

    chunks, session = build_bf16("pr2", seed=5)
    full = setup_bf16(chunks, use_distributed)
    assert type(full.optimizer.chained_optimizers[0]).__name__ == kind
    assert type(full.optimizer.chained_optimizers[0].optimizer) in (
        torch.optim.Adam,
        torch.optim.AdamW,
    )
    assert {p.dtype for p in session.predictor_parameters()} == {torch.float32}
    full_losses, full_weights = run_rollouts(full, session, batches, rollouts=3)

    chunks, session = build_bf16("pr2", seed=5)
    first = setup_bf16(chunks, use_distributed)
    run_rollouts(first, session, batches, rollouts=1)
    save_checkpoint(first, tmp_path / "ckpt")
    assert adam_steps(first) == {float(KAPPA)}

    chunks, session = build_bf16("pr2", seed=77)  # different init: all must come from disk
    resumed = setup_bf16(chunks, use_distributed)
    load_checkpoint(resumed, tmp_path / "ckpt")
    assert adam_steps(resumed) == {float(KAPPA)}
    groups = predictor_groups(resumed.optimizer)
    assert len(groups) == 1 and groups[0]["lr"] == LR * MULT
    resumed_losses, resumed_weights = run_rollouts(resumed, session, batches, rollouts=2)
    # one Adam step per mini-step: a step tensor shared by all params would count them all
    assert adam_steps(resumed) == {float(3 * KAPPA)}

    for want, got in zip(full_losses[KAPPA:], resumed_losses):
        assert torch.equal(want, got)
    for want, got in zip(full_weights[KAPPA:], resumed_weights):
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    # the whole resumed model, bf16 matrices and fp32 norms included
    want_state, got_state = export_state_dict(full.modules), export_state_dict(resumed.modules)
    assert want_state.keys() == got_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(tensor, got_state[name]), name


def test_a_second_save_after_the_resume_loads_again(world1, tmp_path):
    """Save -> resume -> save again: the resumed optimizer's state saves like a fresh one's."""
    batches = h.make_batches(2)
    chunks, session = build_bf16("pr2", seed=5)
    setup = setup_bf16(chunks)
    run_rollouts(setup, session, batches, rollouts=1)
    save_checkpoint(setup, tmp_path / "a")
    chunks, session = build_bf16("pr2", seed=77)
    setup = setup_bf16(chunks)
    load_checkpoint(setup, tmp_path / "a")
    run_rollouts(setup, session, batches, rollouts=1)
    save_checkpoint(setup, tmp_path / "b")
    chunks, session = build_bf16("pr2", seed=78)
    again = setup_bf16(chunks)
    load_checkpoint(again, tmp_path / "b")
    assert adam_steps(again) == {float(2 * KAPPA)}


@pytest.mark.parametrize(
    ("mode", "use_distributed"),
    [("r2", True), ("pr2", True), ("pr2_r3", True), ("pr2", False)],
)
def test_trainer_resume_with_the_recipe_defaults_matches_the_uninterrupted_run(
    world1, tmp_path, mode, use_distributed
):
    """The GRPO trainer in bf16 with the distributed optimizer (the recipes' default) or the
    plain one: step 3 after a resume from step 2's checkpoint logs exactly the metrics of an
    uninterrupted 3-step run."""
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train
    from tests.unit.test_rl_trainer import TINY, tiny_overrides

    def run(name: str, steps: int) -> list[dict]:
        out = tmp_path / name
        overrides = [
            *tiny_overrides(mode, str(out / "logs")),
            "policy.precision=bfloat16",
            f"policy.use_distributed_optimizer={str(use_distributed).lower()}",
            "checkpointing.enabled=true",
            f"checkpointing.checkpoint_dir={out / 'ckpt'}",
            "checkpointing.save_period=1",
            f"grpo.max_num_steps={steps}",
        ]
        return train(load_config(TINY, overrides))

    uninterrupted = run("full", 3)
    assert [m["step"] for m in run("split", 2)] == [1, 2]
    resumed = run("split", 3)
    assert [m["step"] for m in resumed] == [3]
    want, got = _comparable(uninterrupted[2]), _comparable(resumed[0])
    assert got.keys() == want.keys()
    assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("timing/", "sft/"))}
