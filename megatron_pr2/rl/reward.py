"""Rewards for verifiable answers: ``math_verify`` (symbolic) and exact match.

``math_verify`` is the reward of the DAPO/NeMo-RL math recipes: the final answer is extracted
from the response (``\\boxed{...}``, ``Answer: ...`` or the last expression) and compared with
the ground truth symbolically, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` agree.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RewardFn", "exact_match_reward", "make_reward", "math_verify_reward"]

RewardFn = Callable[[str, str], float]


def _parse_gold(answer: str) -> list:
    from math_verify import parse

    gold = parse(answer)
    if not gold and not answer.startswith("$"):  # bare LaTeX (\frac12) needs math delimiters
        gold = parse(f"${answer}$")
    return gold


def math_verify_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals ``answer`` symbolically, else 0.0.

    A ground truth that math_verify cannot parse at all is compared as text, so a dataset of
    non-math answers does not score every response 0 without saying why.
    """
    from math_verify import parse, verify

    gold = _parse_gold(answer)
    if not gold:
        return exact_match_reward(response, answer)
    predicted = parse(response)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted) else 0.0


def exact_match_reward(response: str, answer: str) -> float:
    """1.0 when the response, stripped of surrounding white space, equals the answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0


def make_reward(name: str) -> RewardFn:
    """The reward function named by ``data.reward``."""
    rewards: dict[str, RewardFn] = {
        "math_verify": math_verify_reward,
        "exact_match": exact_match_reward,
    }
    if name not in rewards:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(rewards)}")
    return rewards[name]
