"""A synthetic, verifiable RL task generated in code: multi-digit addition or digit sorting.

Offline and deterministic, so an end-to-end RL run (warm start, rollouts, exact-match rewards,
GRPO updates) can be tested on a tiny model without downloads. Difficulty is the number of digits.

Text layout (specials in angle brackets, not characters of the text):
    addition: ``<bos>12+345=`` -> ``357<eos>``
    sorting:  ``<bos>S3141=``  -> ``1134<eos>``
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "CharTokenizer",
    "Prompt",
    "SupervisedExample",
    "SyntheticTask",
    "TaskConfig",
    "collate_supervised",
    "supervised_example",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DEFAULT_CHARS = "0123456789+=S"
SEP = "="
SORT_MARKER = "S"


class CharTokenizer:
    """One id per character plus pad (0), bos (1), eos (2); small enough for a toy model."""

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        self.tokens: list[str] = [PAD, BOS, EOS, *chars]
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.sep_id = self._ids[SEP] if SEP in self._ids else -1

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Characters -> ids; unknown characters raise instead of silently mapping to pad."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Ids -> text, dropping pad/bos and (by default) everything from the first eos."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                if stop_at_eos:
                    break
                continue
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.tokens[i])
        return "".join(out)


@dataclass
class TaskConfig:
    """Which task and how hard.

    Attributes:
        kind: ``add`` (a + b) or ``sort`` (the digits in ascending order).
        min_digits / max_digits: digits per operand (add) or list length (sort), drawn uniformly.
        reverse_answer: write the answer reversed (least significant digit first for addition),
            which a small causal model learns much faster because carries flow left to right.
        partial_credit: weight of per-position credit for wrong answers; reward for a non-exact
            answer is ``partial_credit * matching_positions / max(len(answer), len(response))``.
            0 gives a binary exact-match reward.
        warm_start_noise: probability that a supervised warm-start answer is a near miss (one
            digit replaced by another) instead of the right one. The warm-started policy then
            knows the answers but also puts mass on near misses, like a pretrained model that is
            right often but not reliably: the regime where GRPO sharpens pass@k into pass@1.
    """

    kind: Literal["add", "sort"] = "add"
    min_digits: int = 1
    max_digits: int = 3
    reverse_answer: bool = False
    partial_credit: float = 0.0
    warm_start_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("add", "sort"):
            raise ValueError(f"task kind must be add or sort, got {self.kind!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        if not 0.0 <= self.partial_credit <= 1.0:
            raise ValueError("partial_credit must be in [0, 1]")
        if not 0.0 <= self.warm_start_noise < 1.0:
            raise ValueError("warm_start_noise must be in [0, 1)")


@dataclass(frozen=True)
class Prompt:
    """One problem: ``tokens`` starts with bos and ends with the separator."""

    text: str
    tokens: list[int]
    answer: str
    answer_tokens: list[int]  # answer ids followed by eos: the ideal response


@dataclass(frozen=True)
class SupervisedExample:
    """Prompt + ideal response; ``loss_mask[i] = 1`` where token i is a target (the answer+eos).

    The mask is aligned with ``tokens``: the trainer predicts token i from position i - 1, so it
    shifts the mask together with the labels.
    """

    tokens: list[int]
    loss_mask: list[int]
    prompt: Prompt = field(repr=False)


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


class SyntheticTask:
    """Problem generator, reward function and warm-start data for one :class:`TaskConfig`."""

    def __init__(self, config: TaskConfig | None = None, tokenizer: CharTokenizer | None = None):
        self.config = config or TaskConfig()
        self.tokenizer = tokenizer or CharTokenizer()

    # -- sizes, for choosing generation lengths and model context -------------------------------
    @property
    def max_prompt_len(self) -> int:
        """Longest prompt in tokens (bos included)."""
        d = self.config.max_digits
        body = 2 * d + 1 if self.config.kind == "add" else d + 1  # operands+'+' or 'S'+digits
        return 1 + body + 1

    @property
    def max_answer_len(self) -> int:
        """Longest ideal response in tokens (eos included)."""
        d = self.config.max_digits
        return (d + 1 if self.config.kind == "add" else d) + 1

    # -- problems ------------------------------------------------------------------------------
    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.config.min_digits, self.config.max_digits)
        return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)

    def _problem(self, rng: random.Random) -> tuple[str, str]:
        cfg = self.config
        if cfg.kind == "add":
            a, b = self._number(rng), self._number(rng)
            text, answer = f"{a}+{b}{SEP}", str(a + b)
        else:
            n = rng.randint(cfg.min_digits, cfg.max_digits)
            digits = [str(rng.randint(0, 9)) for _ in range(n)]
            text, answer = f"{SORT_MARKER}{''.join(digits)}{SEP}", "".join(sorted(digits))
        if cfg.reverse_answer:
            answer = answer[::-1]
        return text, answer

    def make_prompts(self, n: int, rng: random.Random | int) -> list[Prompt]:
        """``n`` problems; the same seed (or a Random in the same state) gives the same list."""
        rng = _as_rng(rng)
        tok = self.tokenizer
        out = []
        for _ in range(n):
            text, answer = self._problem(rng)
            out.append(
                Prompt(
                    text=text,
                    tokens=tok.encode(text, bos=True),
                    answer=answer,
                    answer_tokens=tok.encode(answer, eos=True),
                )
            )
        return out

    # -- reward --------------------------------------------------------------------------------
    def reward(self, prompt: Prompt, response_tokens: Sequence[int] | torch.Tensor) -> float:
        """1.0 for an exact answer, else optional partial credit (see :class:`TaskConfig`).

        The response is read up to its first eos or pad, so generation padding never matters.
        """
        ids = (
            response_tokens.tolist()
            if isinstance(response_tokens, torch.Tensor)
            else response_tokens
        )
        tok = self.tokenizer
        resp: list[int] = []
        for i in ids:
            i = int(i)
            if i in (tok.eos_id, tok.pad_id):
                break
            resp.append(i)
        target = prompt.answer_tokens[:-1]  # without eos
        if resp == target:
            return 1.0
        if self.config.partial_credit == 0.0:
            return 0.0
        matches = sum(int(a == b) for a, b in zip(resp, target))
        return self.config.partial_credit * matches / max(len(resp), len(target))

    # -- supervised warm start -----------------------------------------------------------------
    def supervised_examples(self, n: int, rng: random.Random | int) -> list[SupervisedExample]:
        """Prompt + answer + eos, the loss on the answer and eos only; the answer is a near miss
        with probability ``warm_start_noise``."""
        rng = _as_rng(rng)
        prompts = self.make_prompts(n, rng)
        if self.config.warm_start_noise > 0.0:  # no extra draws otherwise: same stream as before
            prompts = [
                self._near_miss(p, rng) if rng.random() < self.config.warm_start_noise else p
                for p in prompts
            ]
        return [supervised_example(p) for p in prompts]

    def _near_miss(self, prompt: Prompt, rng: random.Random) -> Prompt:
        """The prompt with one digit of its answer replaced by another digit."""
        digits = list(prompt.answer)
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        answer = "".join(digits)
        return Prompt(
            text=prompt.text,
            tokens=prompt.tokens,
            answer=answer,
            answer_tokens=self.tokenizer.encode(answer, eos=True),
        )

    def collate(self, examples: Sequence[SupervisedExample]) -> dict[str, torch.Tensor]:
        return collate_supervised(examples, self.tokenizer.pad_id)


def supervised_example(prompt: Prompt) -> SupervisedExample:
    """Prompt + its answer tokens (eos included), the loss on the answer part only."""
    tokens = prompt.tokens + prompt.answer_tokens
    mask = [0] * len(prompt.tokens) + [1] * len(prompt.answer_tokens)
    return SupervisedExample(tokens=tokens, loss_mask=mask, prompt=prompt)


def collate_supervised(
    examples: Sequence[SupervisedExample], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad to a batch: ``input_ids`` [B, S] long, ``loss_mask`` [B, S] float,
    ``lengths`` [B] long."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, e in enumerate(examples):
        ids[row, : len(e.tokens)] = torch.tensor(e.tokens, dtype=torch.long)
        mask[row, : len(e.loss_mask)] = torch.tensor(e.loss_mask, dtype=torch.float32)
    lengths = torch.tensor([len(e.tokens) for e in examples], dtype=torch.long)
    return {"input_ids": ids, "loss_mask": mask, "lengths": lengths}
