"""Validation during GRPO: accuracy avg@k on held-out prompts (``grpo.val_period``).

avg@k, as AIME-style evaluations report it: every prompt is sampled ``k`` times
(``grpo.val_num_generations_per_prompt``) at the validation temperature and the accuracy is the
mean over all ``prompts x k`` samples. Prompts come from ``data.val_files`` (in file order) or,
for the synthetic task, a fixed set drawn from its own seed, so every validation of a run and of
its resumption sees the same prompts. Sampling uses its own generator: validating never changes
what the training steps sample.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from megatron_pr2.rl.config import MasterConfig
from megatron_pr2.rl.data import DataConfig
from megatron_pr2.rl.dataset_task import DatasetTask
from megatron_pr2.rl.task import Prompt, SyntheticTask

__all__ = ["VAL_SEED_OFFSET", "Validator"]

VAL_SEED_OFFSET = 7919  # validation prompts and samples never share a stream with training


class Validator:
    """Held-out prompts and the scoring of one validation pass."""

    def __init__(self, config: MasterConfig, task: SyntheticTask | DatasetTask) -> None:
        g = config.grpo
        self.k = g.val_num_generations_per_prompt
        self.temperature = (
            g.val_temperature if g.val_temperature is not None else config.generation.temperature
        )
        self.seed = g.seed + VAL_SEED_OFFSET
        if isinstance(task, DatasetTask):
            files = DataConfig.as_list(config.data.val_files)
            if not files:
                raise ValueError("grpo.val_period > 0 with data.train_files needs data.val_files")
            self.task: SyntheticTask | DatasetTask = DatasetTask(
                config.data, task.tokenizer, task.max_new_tokens, files=files
            )
            prompts = list(self.task.prompts)
        else:
            self.task = task
            prompts = task.make_prompts(g.max_val_samples or 32, random.Random(self.seed))
        self.prompts: list[Prompt] = prompts[: g.max_val_samples or len(prompts)]

    def expanded(self) -> list[Sequence[int]]:
        """Prompt tokens, each repeated ``k`` times (the batch the engine samples)."""
        return [p.tokens for p in self.prompts for _ in range(self.k)]

    def score(self, responses: Sequence[torch.Tensor]) -> dict[str, float]:
        """``validation/*`` metrics for the engine's responses to :meth:`expanded`."""
        rewards = torch.tensor(
            [self.task.reward(self.prompts[i // self.k], r) for i, r in enumerate(responses)],
            dtype=torch.float32,
        )
        correct = (rewards == 1.0).float().view(len(self.prompts), self.k)
        return {
            "validation/accuracy": float(correct.mean()),
            "validation/reward": float(rewards.mean()),
            "validation/pass_at_k": float(correct.amax(1).mean()),
            "validation/num_prompts": float(len(self.prompts)),
        }

    def sampler(self, step: int) -> torch.Generator:
        """Per-validation generator: the same samples for the same step, resumed or not."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)
