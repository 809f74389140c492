"""The world-1 GRPO trainer: config loading/overrides and two short steps per replay mode."""

from __future__ import annotations

import json
import math

import pytest

from megatron_pr2.rl.config import apply_overrides, config_from_dict, load_config
from megatron_pr2.rl.trainer import ZERO_DEVIATION, train

TINY = "examples/tiny/grpo_tiny.yaml"


def test_overrides_parse_with_yaml_values():
    cfg = load_config(
        TINY,
        [
            "grpo.max_num_steps=7",
            "policy.lr=1e-4",  # YAML 1.1 reads this as a string; float fields accept it
            "policy.router_replay.mode=PR2",
            "policy.router_replay.predictor.lr_mult=5",
            "loss_fn.ratio_clip_c=3.0",
            "task.kind=sort",
            "generation.max_new_tokens=null",
        ],
    )
    assert cfg.grpo.max_num_steps == 7
    assert cfg.policy.lr == 1e-4 and isinstance(cfg.policy.lr, float)
    assert cfg.policy.router_replay.mode == "pr2"
    assert cfg.policy.router_replay.predictor.lr_mult == 5.0
    assert cfg.loss_config().ratio_clip_c == 3.0
    assert cfg.task.kind == "sort"
    assert cfg.generation.max_new_tokens is None
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize(
    "override, key",
    [
        ("grpo.num_prompt_per_step=3", "grpo.num_prompt_per_step"),
        ("policy.router_replay.predictor.lr_multi=3", "policy.router_replay.predictor.lr_multi"),
        ("loss_fn.ratio_clip=0.1", "ratio_clip"),
        ("nope=1", "nope"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_bad_values_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="not of the form"):
        load_config(None, ["grpo.seed"])
    with pytest.raises(ValueError, match="unknown mode"):
        config_from_dict({"policy": {"router_replay": {"mode": "r4"}}})
    with pytest.raises(ValueError, match="off_policy_steps"):
        config_from_dict({"grpo": {"num_prompts_per_step": 3, "num_generations_per_prompt": 1}})


def tiny_overrides(mode: str, log_dir: str) -> list[str]:
    return [
        f"policy.router_replay.mode={mode}",
        f"logger.log_dir={log_dir}",
        "grpo.max_num_steps=2",
        "grpo.sft_warmup_steps=2",
        "grpo.sft_batch_size=4",
        "grpo.num_prompts_per_step=2",
        "grpo.num_generations_per_prompt=4",
        "grpo.off_policy_steps=2",
        "policy.micro_batch_size=2",
        "generation.max_new_tokens=3",
    ]


@pytest.mark.parametrize("mode", ["none", "r2", "r3", "pr2", "pr2_r3"])
def test_two_grpo_steps(world1, tmp_path, mode):
    cfg = load_config(TINY, tiny_overrides(mode, str(tmp_path)))
    history = train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        for name, value in metrics.items():
            assert math.isfinite(value), name
        assert 0.0 <= metrics["train/reward"] <= 1.0
        assert metrics["train/response_length"] > 0
        for i in range(2):
            assert f"train/loss/mini_step_{i}" in metrics
            assert f"train/token_mult_prob_error/mini_step_{i}" in metrics
        assert metrics["train/token_mult_prob_error"] >= 1.0
        assert "timing/train/total_step_time" in metrics
        # Every mode reports replay metrics; under `none` they measure live drift.
        assert f"{ZERO_DEVIATION}/mini_step_1" in metrics
        if mode in ("none", "r2") or (mode == "pr2" and metrics["step"] == 1):
            # The same weights just recorded these routes. pr2 only at step 1 (zero predictor):
            # afterwards the trained predictor's routes differ from live routing by design.
            assert metrics[f"{ZERO_DEVIATION}/mini_step_0"] == 1.0
        if mode in ("pr2", "pr2_r3"):
            assert "train/pr2/predictive_loss/mini_step_1" in metrics
            assert "train/pr2/predictive_loss/mini_step_0" not in metrics
        if mode in ("r3", "pr2_r3"):
            assert metrics["train/logprobs/router_replay/tokens"] > 0
            # the rollout-vs-training numerics gap at mini-step 0 (bf16 engine, fp32 trainer)
            assert metrics["train/gen_kl_error/mini_step_0"] > 0.0
            assert metrics["train/token_mult_prob_error/mini_step_0"] != 1.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (
        json.loads((tmp_path / "config.json").read_text())["policy"]["router_replay"]["mode"]
        == mode
    )


def test_none_at_off4_shows_router_drift(world1, tmp_path):
    """Live routing drifts away from the old-log-prob pass's routes within one rollout batch:
    measured by the `none` mode's observe passes, clearly below 1 at the last mini-step."""
    overrides = [
        "policy.router_replay.mode=none",
        f"logger.log_dir={tmp_path}",
        "logger.progress_bar=false",
        "grpo.max_num_steps=3",
        "grpo.off_policy_steps=4",
    ]
    history = train(load_config(TINY, overrides))
    first = [m[f"{ZERO_DEVIATION}/mini_step_0"] for m in history]
    last = [m[f"{ZERO_DEVIATION}/mini_step_3"] for m in history]
    assert first == [1.0, 1.0, 1.0]  # mini-step 0: the weights that recorded the routes
    assert sum(last) / len(last) < 0.97, last


def test_two_runs_stepped_alternately_match_each_run_alone(world1, tmp_path):
    """``training_steps`` lets a caller interleave runs in one process (bench_loop's stepped
    pairs). The runs must not share state: each interleaved run's metrics equal its solo run's
    (timings aside)."""
    from megatron_pr2.rl.trainer import training_steps

    def config(mode: str, name: str):
        return load_config(TINY, [*tiny_overrides(mode, str(tmp_path / name)), "grpo.seed=3"])

    def comparable(history):
        return [{k: v for k, v in m.items() if not k.startswith("timing/")} for m in history]

    alone = {mode: comparable(train(config(mode, f"{mode}-alone"))) for mode in ("r2", "pr2")}
    runs = {mode: training_steps(config(mode, f"{mode}-paired")) for mode in ("pr2", "r2")}
    paired: dict[str, list] = {"r2": [], "pr2": []}
    for step in range(2):
        for mode in ("pr2", "r2") if step % 2 == 0 else ("r2", "pr2"):
            paired[mode].append(next(runs[mode]))
    for mode in ("r2", "pr2"):
        assert next(runs[mode], None) is None  # max_num_steps=2: the run is over
        assert comparable(paired[mode]) == alone[mode], mode
