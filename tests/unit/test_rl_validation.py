"""Validation avg@k: held-out prompts fixed per run, scores from the task's reward."""

from __future__ import annotations

import torch

from megatron_pr2.rl.config import load_config
from megatron_pr2.rl.task import SyntheticTask
from megatron_pr2.rl.validation import Validator

TINY = "examples/tiny/grpo_tiny.yaml"


def test_avg_at_k_and_pass_at_k_from_known_responses():
    config = load_config(
        TINY,
        ["grpo.val_period=1", "grpo.max_val_samples=3", "grpo.val_num_generations_per_prompt=2"],
    )
    task = SyntheticTask(config.task)
    validator = Validator(config, task)
    assert len(validator.prompts) == 3 and len(validator.expanded()) == 6
    right = [torch.tensor(p.answer_tokens) for p in validator.prompts]
    wrong = torch.tensor([task.tokenizer.eos_id])
    # prompt 0: both right; prompt 1: one of two; prompt 2: none
    responses = [right[0], right[0], right[1], wrong, wrong, wrong]
    metrics = validator.score(responses)
    assert metrics["validation/accuracy"] == 3 / 6
    assert abs(metrics["validation/pass_at_k"] - 2 / 3) < 1e-6
    # the same run (and its resumption) validates on the same prompts and samples
    again = Validator(config, SyntheticTask(config.task))
    assert [p.tokens for p in again.prompts] == [p.tokens for p in validator.prompts]
    assert torch.equal(
        torch.rand(4, generator=validator.sampler(5)), torch.rand(4, generator=again.sampler(5))
    )


def test_validation_sample_count_need_not_split_into_micro_batches(world1, tmp_path):
    """5 validation prompts with micro-batches of 4: validates (it used to fail after training)."""
    from megatron_pr2.rl.trainer import training_steps

    config = load_config(
        TINY,
        [
            "grpo.max_num_steps=1",
            "grpo.sft_warmup_steps=0",
            "grpo.val_period=1",
            "grpo.max_val_samples=5",
            "policy.micro_batch_size=4",
            f"logger.log_dir={tmp_path}",
            "logger.tensorboard_enabled=false",
            "logger.progress_bar=false",
        ],
    )
    (metrics,) = list(training_steps(config))
    assert metrics["validation/num_prompts"] == 5.0
    assert metrics["validation/accuracy"] in {i / 5 for i in range(6)}
