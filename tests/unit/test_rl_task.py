"""Synthetic task (tokenizer, prompts, rewards, warm-start data) and GRPO advantages."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_pr2.rl.advantages import broadcast_to_tokens, grpo_advantages
from megatron_pr2.rl.task import CharTokenizer, Prompt, SyntheticTask, TaskConfig

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    assert tok.vocab_size <= 32
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "12+345=S0"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.sep_id == tok.encode("=")[0]
    # Decoding stops at eos and skips pad.
    assert tok.decode([*tok.encode("12"), tok.eos_id, *tok.encode("9")]) == "12"
    assert tok.decode([*tok.encode("12"), tok.pad_id, tok.pad_id]) == "12"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("12a")


# ---------------------------------------------------------------------------------------------
# Prompts and determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["add", "sort"])
def test_prompts_are_correct_and_fit_declared_lengths(kind):
    task = SyntheticTask(TaskConfig(kind=kind, min_digits=1, max_digits=4))
    tok = task.tokenizer
    for p in task.make_prompts(200, 0):
        assert p.tokens[0] == tok.bos_id and p.tokens[-1] == tok.sep_id
        assert tok.decode(p.tokens) == p.text
        assert p.answer_tokens[-1] == tok.eos_id and tok.decode(p.answer_tokens) == p.answer
        assert len(p.tokens) <= task.max_prompt_len
        assert len(p.answer_tokens) <= task.max_answer_len
        body = p.text[:-1]
        if kind == "add":
            a, b = body.split("+")
            assert int(p.answer) == int(a) + int(b)
            assert all(1 <= len(x) <= 4 for x in (a, b))
        else:
            assert body[0] == "S" and p.answer == "".join(sorted(body[1:]))


def test_reverse_answer():
    task = SyntheticTask(TaskConfig(kind="add", reverse_answer=True))
    for p in task.make_prompts(20, 3):
        a, b = p.text[:-1].split("+")
        assert p.answer == str(int(a) + int(b))[::-1]


def test_determinism():
    task = SyntheticTask(TaskConfig(max_digits=5))
    a = task.make_prompts(50, 1234)
    b = task.make_prompts(50, random.Random(1234))
    c = task.make_prompts(50, 1235)
    assert a == b
    assert a != c
    assert task.supervised_examples(10, 7) == task.supervised_examples(10, 7)


def test_difficulty_controls_digits():
    easy = SyntheticTask(TaskConfig(min_digits=1, max_digits=1)).make_prompts(100, 0)
    hard = SyntheticTask(TaskConfig(min_digits=5, max_digits=5)).make_prompts(100, 0)
    assert all(len(p.text) == 4 for p in easy)  # "a+b="
    assert all(len(p.text) == 12 for p in hard)  # 5 + 1 + 5 + 1


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def _prompt(task, text):
    """A fixed addition problem, built by hand so the expected answer is explicit."""
    tok = task.tokenizer
    a, b = text[:-1].split("+")
    answer = str(int(a) + int(b))
    return Prompt(text, tok.encode(text, bos=True), answer, tok.encode(answer, eos=True))


def test_exact_match_reward():
    task = SyntheticTask(TaskConfig(kind="add"))
    tok = task.tokenizer
    p = _prompt(task, "12+34=")
    assert task.reward(p, tok.encode("46", eos=True)) == 1.0
    assert task.reward(p, [*tok.encode("46", eos=True), *tok.encode("99")]) == 1.0  # after eos
    assert task.reward(p, tok.encode("46") + [tok.pad_id] * 3) == 1.0
    assert task.reward(p, torch.tensor(tok.encode("46", eos=True))) == 1.0
    assert task.reward(p, tok.encode("45", eos=True)) == 0.0
    assert task.reward(p, tok.encode("461", eos=True)) == 0.0
    assert task.reward(p, [tok.eos_id]) == 0.0


def test_partial_credit_reward():
    task = SyntheticTask(TaskConfig(kind="add", partial_credit=0.5))
    tok = task.tokenizer
    p = _prompt(task, "512+512=")  # answer 1024
    assert task.reward(p, tok.encode("1024", eos=True)) == 1.0
    assert task.reward(p, tok.encode("1034", eos=True)) == pytest.approx(0.5 * 3 / 4)
    assert task.reward(p, tok.encode("10", eos=True)) == pytest.approx(0.5 * 2 / 4)
    assert task.reward(p, tok.encode("102400", eos=True)) == pytest.approx(0.5 * 4 / 6)
    assert task.reward(p, tok.encode("9999", eos=True)) == 0.0


# ---------------------------------------------------------------------------------------------
# Supervised warm start
# ---------------------------------------------------------------------------------------------


def test_supervised_examples_mask_only_the_answer():
    task = SyntheticTask(TaskConfig(kind="sort", max_digits=4))
    tok = task.tokenizer
    examples = task.supervised_examples(30, 5)
    for e in examples:
        n_prompt = len(e.prompt.tokens)
        assert e.tokens == e.prompt.tokens + e.prompt.answer_tokens
        assert len(e.loss_mask) == len(e.tokens)
        assert e.loss_mask[:n_prompt] == [0] * n_prompt
        assert e.loss_mask[n_prompt:] == [1] * len(e.prompt.answer_tokens)
        assert e.tokens[-1] == tok.eos_id
        # Masked tokens are exactly the ideal response, which earns full reward.
        answer = [x for x, m in zip(e.tokens, e.loss_mask) if m]
        assert task.reward(e.prompt, answer) == 1.0

    batch = task.collate(examples)
    width = max(len(e.tokens) for e in examples)
    assert batch["input_ids"].shape == (30, width)
    assert batch["loss_mask"].shape == (30, width)
    for row, e in enumerate(examples):
        n = len(e.tokens)
        assert batch["lengths"][row] == n
        assert batch["input_ids"][row, :n].tolist() == e.tokens
        assert (batch["input_ids"][row, n:] == tok.pad_id).all()
        assert batch["loss_mask"][row].sum() == len(e.prompt.answer_tokens)


# ---------------------------------------------------------------------------------------------
# GRPO advantages
# ---------------------------------------------------------------------------------------------


def test_group_normalisation_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # 2 prompts x 4
    adv = grpo_advantages(rewards, 4, eps=0.0)
    # Group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    s0 = math.sqrt(1 / 3)
    # Group 1: mean 0.75, deviations (.25, .25, .25, -.75), std sqrt((3 * .0625 + .5625) / 3) = 0.5
    expected = [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.5, 0.5, 0.5, -1.5]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_mean_only_and_eps():
    rewards = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(
        grpo_advantages(rewards, 2, normalize_std=False), torch.tensor([1.0, -1.0])
    )
    # std = sqrt(2); eps is added to it.
    torch.testing.assert_close(
        grpo_advantages(rewards, 2, eps=0.1),
        torch.tensor([1.0, -1.0]) / (math.sqrt(2.0) + 0.1),
    )


def test_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = grpo_advantages(rewards, 4, normalize_std=False, leave_one_out=True)
    # Sample 0: 1 - mean(0, 0, 0) = 1; others: 0 - mean(1, 0, 0) = -1/3.
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    adv_std = grpo_advantages(rewards, 4, leave_one_out=True, eps=0.0)
    torch.testing.assert_close(adv_std, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]) / 0.5)


def test_zero_std_group_gets_zero_advantage():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.7, 0.7, 0.7])
    for loo in (False, True):
        for norm in (False, True):
            adv = grpo_advantages(rewards, 3, normalize_std=norm, leave_one_out=loo)
            assert (adv[:3] == 0).all() and (adv[6:] == 0).all()
            assert (adv[3:6] != 0).all()
    # Single sample per prompt: nothing to compare with.
    assert (grpo_advantages(torch.tensor([1.0, 0.0]), 1) == 0).all()


def test_advantage_input_validation():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), 1, leave_one_out=True)


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    out = broadcast_to_tokens(adv, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, -1.0, -1.0, 0.0]]))


def test_warm_start_noise_gives_near_misses_at_its_rate():
    config = TaskConfig(kind="add", min_digits=1, max_digits=2, warm_start_noise=0.5)
    noisy = SyntheticTask(config).supervised_examples(400, 3)
    clean_task = SyntheticTask(TaskConfig(kind="add", min_digits=1, max_digits=2))
    misses = 0
    for example in noisy:
        prompt = example.prompt
        a, b = prompt.text.rstrip("=").split("+")
        right = str(int(a) + int(b))
        assert len(prompt.answer) == len(right)
        wrong_digits = sum(x != y for x, y in zip(prompt.answer, right))
        assert wrong_digits in (0, 1)  # a near miss changes exactly one digit
        misses += wrong_digits
        assert example.tokens == prompt.tokens + clean_task.tokenizer.encode(
            prompt.answer, eos=True
        )
    assert 150 < misses < 250
    assert noisy == SyntheticTask(config).supervised_examples(400, 3)  # deterministic


def test_warm_start_noise_off_keeps_the_random_stream():
    task = SyntheticTask(TaskConfig(kind="add", warm_start_noise=0.0))
    examples = task.supervised_examples(20, 11)
    assert [e.prompt for e in examples] == task.make_prompts(20, 11)
