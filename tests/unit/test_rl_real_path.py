"""The recipes' own path at tiny scale: a Hugging Face Qwen3-MoE folder (weights + tokenizer)
converted with ``pr2 convert``, DAPO-Math-schema parquet, math_verify rewards, checkpoints and a
resumed step; the trainer gets only ``policy.model_path`` and ``data.train_files``."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")


def test_converted_model_trains_on_dataset_files_and_resumes(world1, tmp_path):
    from megatron_pr2.convert.hf_to_mcore import hf_to_mcore
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train
    from tests.support.hf_models import build_hf_model, save
    from tests.support.rl_data import dapo_rows, save_char_tokenizer, write_parquet

    hf_dir = save(build_hf_model("qwen3_moe", seed=5), tmp_path / "hf")
    save_char_tokenizer(hf_dir)  # a model folder carries its tokenizer
    mcore_dir = tmp_path / "mcore"
    hf_to_mcore(hf_dir, mcore_dir, show_progress=False)
    assert (mcore_dir / "tokenizer.json").is_file()  # pr2 convert copies it along
    data = write_parquet(
        tmp_path / "dapo.parquet",
        dapo_rows([(f"What is {a}*{b}?", str(a * b)) for a in range(2, 5) for b in range(2, 5)]),
    )

    val = write_parquet(tmp_path / "val.parquet", dapo_rows([("What is 9*9?", "81")] * 3))

    def overrides(steps: int) -> list[str]:
        return [
            f"policy.model_path={mcore_dir}",
            f"data.train_files=[{data}]",
            "policy.router_replay.mode=pr2_r3",
            f"logger.log_dir={tmp_path / 'logs'}",
            "logger.progress_bar=false",
            "logger.tensorboard_enabled=false",
            f"grpo.max_num_steps={steps}",
            "grpo.sft_warmup_steps=0",
            "grpo.num_prompts_per_step=2",
            "grpo.num_generations_per_prompt=4",
            "grpo.off_policy_steps=2",
            "policy.micro_batch_size=2",
            "generation.max_new_tokens=6",
            "checkpointing.enabled=true",
            f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
            "checkpointing.save_period=1",
            f"data.val_files=[{val}]",
            "grpo.val_period=2",
            "grpo.val_num_generations_per_prompt=2",
        ]

    config = "examples/tiny/grpo_tiny.yaml"
    history = train(load_config(config, overrides(2)))
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert "train/pr2/predictive_loss/mini_step_1" in metrics
    assert (tmp_path / "ckpt" / "step_2").is_dir()
    # validation after step 2 (val_period) only: 3 prompts x avg@2
    assert "validation/accuracy" not in history[0]
    assert history[1]["validation/num_prompts"] == 3.0
    assert history[1]["validation/accuracy"] in {i / 6 for i in range(7)}
    resumed = train(load_config(config, overrides(3)))
    assert [m["step"] for m in resumed] == [3]
    assert "validation/accuracy" in resumed[0]  # the last step validates too
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_random_init_builds_the_hf_architecture_not_the_tiny_gpt(world1, tmp_path):
    """model.random_init (smoke runs): the Qwen3-MoE architecture of a config.json, random
    weights, the tokenizer named separately."""
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import training_steps
    from tests.support.hf_models import build_hf_model, save
    from tests.support.rl_data import dapo_rows, save_char_tokenizer, write_parquet

    hf_dir = save(build_hf_model("qwen3_moe", seed=2), tmp_path / "hf")
    for weights in hf_dir.glob("*.safetensors"):
        weights.unlink()  # the architecture comes from config.json alone
    tok = save_char_tokenizer(tmp_path / "tok")
    data = write_parquet(tmp_path / "d.parquet", dapo_rows([("1+1?", "2"), ("2+2?", "4")]))
    overrides = [
        f"policy.random_init_from={hf_dir}",
        f"policy.tokenizer.name={tok}",
        f"data.train_files=[{data}]",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.progress_bar=false",
        "logger.tensorboard_enabled=false",
        "grpo.max_num_steps=1",
        "grpo.sft_warmup_steps=0",
        "grpo.num_prompts_per_step=2",
        "grpo.off_policy_steps=2",
        "policy.micro_batch_size=2",
        "generation.max_new_tokens=4",
    ]
    steps = training_steps(load_config("examples/tiny/grpo_tiny.yaml", overrides))
    metrics = next(steps)
    # 4 MoE layers with GQA and q/k norm, as the HF config says (the tiny GPT has 2, no q/k norm)
    assert "train/router_replay/zero_deviation_ratio/layer_4/mini_step_1" in metrics
    model = steps.gi_frame.f_locals["worker"].modules[0]
    names = [n for n, _ in model.named_parameters()]
    assert any("q_layernorm" in n for n in names) and any("k_layernorm" in n for n in names)
    attention = model.decoder.layers[0].self_attention
    assert attention.config.num_query_groups == 2
