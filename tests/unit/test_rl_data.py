"""Real-data RL inputs: dataset files, named errors, math_verify reward, the HF tokenizer."""

from __future__ import annotations

import pytest

from megatron_pr2.rl.data import DataConfig, DatasetError, load_problems
from megatron_pr2.rl.reward import exact_match_reward, make_reward, math_verify_reward
from megatron_pr2.rl.tokenizer import HFTokenizer, TokenizerError
from tests.support.rl_data import dapo_rows, save_char_tokenizer, write_jsonl, write_parquet

PROBLEMS = [("What is 2+3? Answer: ", "5"), ("Half of 1?", "\\frac{1}{2}")]


@pytest.fixture
def parquet(tmp_path):
    return write_parquet(tmp_path / "train.parquet", dapo_rows(PROBLEMS))


def test_dapo_schema_parquet_and_jsonl_read_the_same(tmp_path, parquet):
    jsonl = write_jsonl(tmp_path / "train.jsonl", dapo_rows(PROBLEMS))
    from_parquet = load_problems([parquet], DataConfig())
    from_jsonl = load_problems([jsonl], DataConfig())
    assert [p.messages for p in from_parquet] == [p.messages for p in from_jsonl]
    assert [p.answer for p in from_parquet] == ["5", "\\frac{1}{2}"]
    assert from_parquet[0].messages == (("user", "What is 2+3? Answer: "),)
    assert from_parquet[1].source == "train.parquet:1"


def test_text_prompt_and_top_level_answer_columns(tmp_path):
    rows = [{"problem": "1+1", "answer": 2}, {"problem": "2+2", "answer": "4"}]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    config = DataConfig(prompt_key="problem", answer_key="answer")
    problems = load_problems([path], config)
    assert [(p.messages, p.answer) for p in problems] == [
        ((("user", "1+1"),), "2"),
        ((("user", "2+2"),), "4"),
    ]


def test_missing_column_names_file_and_column(parquet):
    with pytest.raises(DatasetError, match=r"train\.parquet: missing column 'question'"):
        load_problems([parquet], DataConfig(prompt_key="question"))


def test_empty_file_and_no_rows_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: the file is empty"):
        load_problems([empty], DataConfig())
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DatasetError, match=r"blank\.jsonl"):
        load_problems([blank], DataConfig())
    with pytest.raises(DatasetError, match="no data files"):
        load_problems([], DataConfig())


def test_unparseable_row_names_file_row_and_column(tmp_path):
    rows = dapo_rows(PROBLEMS)
    rows.append({**rows[0], "reward_model": {"ground_truth": "", "style": "rule-lang"}})
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(
        DatasetError, match=r"bad\.parquet: row 2: column 'reward_model\.ground_truth'"
    ):
        load_problems([path], DataConfig())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl: row 1: not valid JSON"):
        load_problems([broken], DataConfig(prompt_key="prompt", answer_key="answer"))
    messages = tmp_path / "messages.jsonl"
    messages.write_text('{"prompt": [{"role": "user"}], "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"messages\.jsonl: row 0: column 'prompt' message 0"):
        load_problems([messages], DataConfig(answer_key="answer"))


def test_math_verify_reward_compares_symbolically():
    assert math_verify_reward("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_verify_reward("Answer: 0.5", "\\frac{1}{2}") == 1.0
    assert math_verify_reward("Answer: 7", "\\frac{1}{2}") == 0.0
    assert math_verify_reward("no number here", "3") == 0.0
    assert make_reward("math_verify") is math_verify_reward


def test_exact_match_reward():
    assert exact_match_reward(" 42\n", "42") == 1.0
    assert exact_match_reward("42.0", "42") == 0.0
    assert make_reward("exact_match") is exact_match_reward
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("f1")
    with pytest.raises(ValueError, match=r"data\.reward"):
        DataConfig(reward="f1")


def test_hf_tokenizer_from_local_directory(tmp_path):
    tok = HFTokenizer(save_char_tokenizer(tmp_path / "tok"))
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == tok.hf.convert_tokens_to_ids("<pad>")
    assert tok.vocab_size == len(tok.hf)
    ids = tok.encode("12+3=15")
    assert tok.decode([*ids, tok.eos_id, *tok.encode("junk")]) == "12+3=15"
    chat = tok.encode_chat([("user", "1+1?")])
    text = tok.hf.decode(chat)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    plain = tok.encode_chat([("user", "1+1?")], use_chat_template=False)
    assert tok.decode(plain) == "1+1?"


def test_tokenizer_errors_name_the_directory(tmp_path):
    with pytest.raises(TokenizerError, match="is not a directory"):
        HFTokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty"):
        HFTokenizer(tmp_path / "empty")


def _task(tmp_path, rows, **data):
    from megatron_pr2.rl.dataset_task import DatasetTask

    path = write_parquet(tmp_path / "train.parquet", rows)
    tok = HFTokenizer(save_char_tokenizer(tmp_path / "tok"))
    config = DataConfig(train_files=[str(path)], **data)
    return DatasetTask(config, tok, max_new_tokens=8)


def test_dataset_task_prompts_use_the_chat_template_and_visit_every_row_per_epoch(tmp_path):
    import random

    rows = dapo_rows([(f"{a}+{a}?", str(2 * a)) for a in range(5)])
    task = _task(tmp_path, rows, system_prompt="Be brief.")
    rng = random.Random(0)
    first = task.make_prompts(5, rng)
    assert sorted(p.text for p in first) == sorted(f"{a}+{a}?" for a in range(5))
    text = task.tokenizer.hf.decode(first[0].tokens)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert task.max_prompt_len == max(len(p.tokens) for p in task.prompts)
    assert task.max_answer_len == 8


def test_dataset_task_resumes_the_epoch_where_it_stopped(tmp_path):
    import random

    rows = dapo_rows([(f"q{a}", str(a)) for a in range(7)])
    straight, resumed = _task(tmp_path, rows), _task(tmp_path, rows)
    rng_a, rng_b = random.Random(3), random.Random(3)
    expected = [p.text for _ in range(4) for p in straight.make_prompts(3, rng_a)]
    seen = [p.text for p in resumed.make_prompts(3, rng_b)]
    state, rng_state = resumed.state_dict(), rng_b.getstate()
    again = _task(tmp_path, rows)
    again.load_state_dict(state)
    rng_c = random.Random()
    rng_c.setstate(rng_state)
    seen += [p.text for _ in range(3) for p in again.make_prompts(3, rng_c)]
    assert seen == expected
    assert sorted(expected[:7]) == sorted(f"q{a}" for a in range(7))  # one full epoch first


def test_dataset_task_reward_decodes_and_verifies(tmp_path):
    task = _task(tmp_path, dapo_rows([("Half of 1?", "\\frac{1}{2}")]))
    (prompt,) = task.make_prompts(1, 0)
    tok = task.tokenizer
    good = [*tok.encode("Answer: 0.5"), tok.eos_id, tok.pad_id, tok.pad_id]
    bad = [*tok.encode("Answer: 2"), tok.eos_id]
    assert task.reward(prompt, good) == 1.0
    assert task.reward(prompt, bad) == 0.0
    batch = task.collate(task.supervised_examples(2, 0))
    assert batch["input_ids"].shape[0] == 2
