"""A Hugging Face MoE model converted to a megatron dist checkpoint trains for a few GRPO steps
(`policy.model_path`) and its trained checkpoint converts back to a folder transformers loads."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")


@pytest.mark.parametrize("mode", ["pr2", "r2"])
def test_converted_qwen3_moe_trains_and_converts_back(world1, tmp_path, mode):
    import transformers

    from megatron_pr2.convert.hf_to_mcore import hf_to_mcore
    from megatron_pr2.convert.mcore_to_hf import mcore_to_hf
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train
    from tests.support.hf_models import build_hf_model, save

    original = build_hf_model("qwen3_moe", seed=3)
    hf_dir = save(original, tmp_path / "hf")
    mcore_dir = tmp_path / "mcore"
    hf_to_mcore(hf_dir, mcore_dir, show_progress=False)

    overrides = [
        f"policy.model_path={mcore_dir}",
        f"policy.router_replay.mode={mode}",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.progress_bar=false",
        "logger.tensorboard_enabled=false",
        "grpo.max_num_steps=2",
        "grpo.sft_warmup_steps=3",
        "grpo.sft_batch_size=4",
        "grpo.num_prompts_per_step=2",
        "grpo.off_policy_steps=2",
        "policy.micro_batch_size=2",
        "checkpointing.enabled=true",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        "checkpointing.save_period=2",
    ]
    history = train(load_config("examples/tiny/grpo_tiny.yaml", overrides))
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
    # the converted model's MoE layers replay (4 layers) and train the predictor
    assert "train/router_replay/zero_deviation_ratio/layer_4/mini_step_1" in history[-1]
    assert ("train/pr2/predictive_loss/mini_step_1" in history[-1]) == (mode == "pr2")

    hf_out = tmp_path / "hf_trained"
    mcore_to_hf(tmp_path / "ckpt" / "step_2" / "model", hf_out, show_progress=False)
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(hf_out)).float().eval()
    before, after = dict(original.named_parameters()), dict(trained.named_parameters())
    assert before.keys() == after.keys()  # no predictor in the HF folder
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "model.layers.0.mlp.gate.weight" in changed  # the router trained
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=tokens).logits).all()
