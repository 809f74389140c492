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
