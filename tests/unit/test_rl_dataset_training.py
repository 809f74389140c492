"""The trainer on dataset files: DAPO-schema parquet, the model's HF tokenizer, math_verify."""

from __future__ import annotations

import json
import math

import pytest

from megatron_pr2.rl.config import load_config
from megatron_pr2.rl.trainer import train
from tests.support.rl_data import dapo_rows, save_char_tokenizer, write_parquet
from tests.unit.test_rl_trainer import TINY, tiny_overrides

QUESTIONS = [(f"{a}+{b}=?", str(a + b)) for a in range(3) for b in range(3)]


def _dataset_overrides(tmp_path, mode: str) -> list[str]:
    data = write_parquet(tmp_path / "train.parquet", dapo_rows(QUESTIONS))
    tok = save_char_tokenizer(tmp_path / "tok")
    return [
        *tiny_overrides(mode, str(tmp_path / "logs")),
        f"data.train_files=[{data}]",
        f"policy.tokenizer.name={tok}",
        "generation.max_new_tokens=4",
    ]


@pytest.mark.parametrize("mode", ["r2", "pr2_r3"])
def test_two_grpo_steps_on_a_dapo_parquet(world1, tmp_path, mode, monkeypatch):
    import megatron_pr2.rl.dataset_task as dataset_task

    verified: list[tuple[str, str]] = []
    real = dataset_task.make_reward("math_verify")

    def spy(response: str, answer: str) -> float:
        verified.append((response, answer))
        return real(response, answer)

    monkeypatch.setattr(dataset_task, "make_reward", lambda name: spy)
    cfg = load_config(TINY, _dataset_overrides(tmp_path, mode))
    history = train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["train/reward"] in {i / 8 for i in range(9)}  # 0/1 rewards of 8 samples
    # Every sample of both steps was scored by math_verify against a ground truth of the file.
    assert len(verified) == 2 * 8
    assert {answer for _, answer in verified} <= {a for _, a in QUESTIONS}
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_dataset_errors_stop_the_run_before_any_step(world1, tmp_path):
    overrides = _dataset_overrides(tmp_path, "r2")
    cfg = load_config(TINY, [*overrides, "data.answer_key=solution"])
    with pytest.raises(ValueError, match=r"train\.parquet: missing column 'solution'"):
        train(cfg)
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()


def test_dataset_runs_need_a_tokenizer_and_a_generation_budget(tmp_path):
    data = write_parquet(tmp_path / "train.parquet", dapo_rows(QUESTIONS))
    with pytest.raises(ValueError, match=r"policy\.tokenizer\.name"):
        load_config(TINY, [f"data.train_files=[{data}]"])
    with pytest.raises(ValueError, match="max_new_tokens is required"):
        load_config(
            TINY,
            [
                f"data.train_files=[{data}]",
                f"policy.tokenizer.name={tmp_path}",
                "generation.max_new_tokens=null",
            ],
        )
