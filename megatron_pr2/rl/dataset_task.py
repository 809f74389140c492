"""A GRPO task read from dataset files, tokenized by the model's own tokenizer.

The same interface as :class:`~megatron_pr2.rl.task.SyntheticTask` (``tokenizer``,
``make_prompts``, ``reward``, ``supervised_examples``, ``collate``, ``max_prompt_len``,
``max_answer_len``), so the trainer runs one code path for the toy task and for DAPO-Math on a
converted Qwen3-MoE checkpoint.

Prompts are visited epoch by epoch in an order shuffled with the run's prompt RNG; the position
in the epoch is part of the checkpoint (:meth:`state_dict`), so a resumed run continues with the
prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.rl.data import DataConfig, DatasetError, Problem, load_problems
from megatron_pr2.rl.reward import make_reward
from megatron_pr2.rl.task import (
    Prompt,
    SupervisedExample,
    collate_supervised,
    supervised_example,
)
from megatron_pr2.rl.tokenizer import HFTokenizer

__all__ = ["DatasetTask"]


class DatasetTask:
    """Prompts from ``data.train_files``, rewards from ``data.reward``."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer: HFTokenizer,
        max_new_tokens: int,
        files: Sequence[str | Path] | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self._reward = make_reward(config.reward)
        problems = load_problems(files or DataConfig.as_list(config.train_files), config)
        self.prompts = [self._prompt(p) for p in problems]
        self._order: list[int] = []
        self._cursor = 0

    def _prompt(self, problem: Problem) -> Prompt:
        messages = list(problem.messages)
        if self.config.prompt_template is not None:  # applied to the last user message
            last = max(i for i, (role, _) in enumerate(messages) if role == "user")
            role, content = messages[last]
            messages[last] = (role, self.config.prompt_template.format(prompt=content))
        if self.config.system_prompt and messages[0][0] != "system":
            messages.insert(0, ("system", self.config.system_prompt))
        tokens = self.tokenizer.encode_chat(
            messages, use_chat_template=self.config.apply_chat_template
        )
        if not tokens:
            raise DatasetError(f"{problem.source}: the prompt tokenizes to nothing")
        return Prompt(
            text=problem.messages[-1][1],
            tokens=tokens,
            answer=problem.answer,
            answer_tokens=self.tokenizer.encode(problem.answer, eos=True),
        )

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def max_prompt_len(self) -> int:
        return max(len(p.tokens) for p in self.prompts)

    @property
    def max_answer_len(self) -> int:
        """Generation budget: responses are open-ended, so ``max_new_tokens`` bounds them."""
        return self.max_new_tokens

    # -- prompts ---------------------------------------------------------------------------------
    def make_prompts(self, n: int, rng: random.Random | int) -> list[Prompt]:
        """The next ``n`` prompts of the shuffled epoch (a new order drawn from ``rng`` when an
        epoch ends; ``data.shuffle=false`` keeps file order)."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        out: list[Prompt] = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = list(range(len(self.prompts)))
                if self.config.shuffle:
                    rng.shuffle(self._order)
                self._cursor = 0
            out.append(self.prompts[self._order[self._cursor]])
            self._cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self._order), "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = [int(i) for i in state["order"]]
        if any(not 0 <= i < len(self.prompts) for i in order):
            raise ValueError(
                f"data position in the checkpoint refers to {max(order) + 1} prompts, the data "
                f"files have {len(self.prompts)}: resume with the files the run started with"
            )
        self._order, self._cursor = order, int(state["cursor"])

    # -- reward ----------------------------------------------------------------------------------
    def reward(self, prompt: Prompt, response_tokens: Sequence[int] | torch.Tensor) -> float:
        ids = (
            response_tokens.tolist()
            if isinstance(response_tokens, torch.Tensor)
            else response_tokens
        )
        pad = self.tokenizer.pad_id
        text = self.tokenizer.decode(
            i for i in ids if int(i) != pad or pad == self.tokenizer.eos_id
        )
        return self._reward(text, prompt.answer)

    # -- supervised warm start (tiny models only; pretrained checkpoints skip it) -----------------
    def supervised_examples(self, n: int, rng: random.Random | int) -> list[SupervisedExample]:
        return [supervised_example(p) for p in self.make_prompts(n, rng)]

    def collate(self, examples: Sequence[SupervisedExample]) -> dict[str, torch.Tensor]:
        return collate_supervised(examples, self.tokenizer.pad_id)
