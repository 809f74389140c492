"""GRPO with ``policy.router_replay.planned_dispatch``: the same run, bit for bit, as megatron's
own dispatch, with ``dispatch/*`` metrics saying every replayed dispatcher call was planned."""

from __future__ import annotations

import pytest

from megatron_pr2.rl.config import config_from_dict, load_config
from megatron_pr2.rl.trainer import train

TINY = "examples/tiny/grpo_tiny.yaml"


def overrides(mode: str, log_dir: str, planned: bool) -> list[str]:
    return [
        f"policy.router_replay.mode={mode}",
        f"policy.router_replay.planned_dispatch={str(planned).lower()}",
        f"logger.log_dir={log_dir}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        "grpo.max_num_steps=2",
        "grpo.sft_warmup_steps=2",
        "grpo.sft_batch_size=4",
        "grpo.num_prompts_per_step=2",
        "grpo.num_generations_per_prompt=4",
        "grpo.off_policy_steps=2",
        "policy.micro_batch_size=2",
        "generation.max_new_tokens=3",
    ]


def split_dispatch(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(every metric but timings and dispatch counts, the dispatch counts) per step."""
    rest = [
        {k: v for k, v in m.items() if not k.startswith("timing/") and "dispatch/" not in k}
        for m in history
    ]
    dispatch = [{k: v for k, v in m.items() if "dispatch/" in k} for m in history]
    return rest, dispatch


def check_planned_run(plain: list[dict], planned: list[dict], mode: str, calls: int) -> None:
    """``calls``: dispatcher calls of one mini-step, summed over ranks."""
    ref, ref_dispatch = split_dispatch(plain)
    got, dispatch = split_dispatch(planned)
    assert ref == got, mode  # every loss, reward, ratio and replay metric identical
    assert all(not d for d in ref_dispatch)  # planning off: no dispatch metrics
    for step in dispatch:
        for i in range(2):
            assert step[f"train/dispatch/planned_calls/mini_step_{i}"] == calls, (mode, step)
            assert step[f"train/dispatch/fallback_calls/mini_step_{i}"] == 0, (mode, step)
        assert step["train/dispatch/plan_bytes"] > 0
        old = "train/logprobs/dispatch/"
        if mode in ("r3", "pr2_r3"):  # the old-log-prob pass replays the engine's routes
            assert step[old + "planned_calls"] == 2 * calls and step[old + "fallback_calls"] == 0
        else:  # it records them: routers live, the plan is built after it
            assert step[old + "planned_calls"] == 0
            assert step[old + "fallback/router_live"] == step[old + "fallback_calls"] > 0


def test_planned_dispatch_config():
    assert config_from_dict({}).policy.router_replay.planned_dispatch is False
    with pytest.raises(ValueError, match="planned_dispatch needs replayed routes"):
        config_from_dict({"policy": {"router_replay": {"mode": "none", "planned_dispatch": True}}})


@pytest.mark.parametrize("mode", ["r2", "r3", "pr2", "pr2_r3"])
def test_grpo_with_planned_dispatch_is_identical(world1, tmp_path, mode):
    plain = train(load_config(TINY, overrides(mode, str(tmp_path / "plain"), False)))
    planned = train(load_config(TINY, overrides(mode, str(tmp_path / "planned"), True)))
    # 2 MoE layers x 2 micro-batches per mini-step (4 samples / micro-batches of 2)
    check_planned_run(plain, planned, mode, calls=2 * 2)


def test_grpo_with_planned_dispatch_and_recompute_is_identical(world1, tmp_path):
    """Full activation recompute: each update pass dispatches every micro-batch twice."""
    extra = ["policy.activation_checkpointing=true"]
    plain = train(load_config(TINY, overrides("r3", str(tmp_path / "a"), False) + extra))
    planned = train(load_config(TINY, overrides("r3", str(tmp_path / "b"), True) + extra))
    ref, _ = split_dispatch(plain)
    got, dispatch = split_dispatch(planned)
    assert ref == got
    for step in dispatch:
        assert step["train/dispatch/planned_calls/mini_step_1"] == 2 * 2 * 2
        assert step["train/dispatch/fallback_calls/mini_step_1"] == 0
