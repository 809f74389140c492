"""What the trainer prints for a newcomer: a line saying what the warm start is, a progress bar
for it, and at the end where the results are and the ``pr2 compare`` command to run on them."""

from __future__ import annotations

from megatron_pr2.rl.config import load_config
from megatron_pr2.rl.trainer import train

TINY = "examples/tiny/grpo_tiny.yaml"


def _run(tmp_path, progress_bar: bool) -> None:
    train(
        load_config(
            TINY,
            [
                f"logger.log_dir={tmp_path}",
                f"logger.progress_bar={str(progress_bar).lower()}",
                "logger.tensorboard_enabled=false",
                "grpo.max_num_steps=1",
                "grpo.sft_warmup_steps=3",
                "grpo.sft_batch_size=4",
                "grpo.num_prompts_per_step=2",
                "grpo.num_generations_per_prompt=2",
                "grpo.off_policy_steps=1",
                "policy.micro_batch_size=2",
                "generation.max_new_tokens=3",
            ],
        )
    )


def test_warm_start_progress_and_where_the_results_are(world1, tmp_path, capsys):
    _run(tmp_path, progress_bar=True)
    captured = capsys.readouterr()
    out_lines = captured.out.splitlines()
    assert out_lines[0].startswith("sft warm start: 3 supervised steps")
    assert "sft: 100%" in captured.err and "3/3" in captured.err  # the warm start's bar
    assert "grpo: 100%" in captured.err
    assert out_lines[-2:] == [
        f"results: {tmp_path}/metrics.jsonl (one JSON line per step)",
        out_lines[-1],
    ]
    assert " compare " in out_lines[-1] and out_lines[-1].endswith(
        f"compare {tmp_path} --out {tmp_path}/comparison"
    )


def test_warm_start_without_bar_prints_plain_lines(world1, tmp_path, capsys):
    _run(tmp_path, progress_bar=False)
    out = capsys.readouterr().out
    assert "sft step 3/3  loss " in out
    assert f"results: {tmp_path}/metrics.jsonl" in out
