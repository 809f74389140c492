"""``pr2 check-recipe``'s static memory vs what the trainer allocates, on a tiny Qwen3-MoE.

The estimate's weights, grads and optimizer bytes (:func:`megatron_pr2.recipes.check.
estimate_memory`) against the tensors megatron's DDP and optimizer really hold after a GRPO
step: the model's parameters, their ``main_grad`` buffers, and the optimizer's state (Adam
moments and fp32 main params, not counting those that are the model's own tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measured(setup) -> dict[str, int]:
    params = [p for chunk in setup.chunks for p in chunk.module.parameters()]
    model_storage = {p.untyped_storage().data_ptr() for p in params}
    optimizers = getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])
    state, main = [], []
    for opt in optimizers:
        inner = opt.optimizer
        for per_param in inner.state.values():
            state += [v for k, v in per_param.items() if k != "step" and torch.is_tensor(v)]
        for group in inner.param_groups:
            main += [
                p for p in group["params"] if p.untyped_storage().data_ptr() not in model_storage
            ]
    return {
        "weights": _bytes(params),
        "grads": _bytes(p.main_grad for p in params),
        "optimizer": _bytes(state) + _bytes(main),
    }


@pytest.mark.parametrize(
    ("precision", "distributed"), [("bfloat16", True), ("bfloat16", False), ("float32", False)]
)
def test_static_estimate_matches_the_trainers_tensors(
    world1, tmp_path: Path, precision: str, distributed: bool
):
    from megatron_pr2.recipes.check import Layout, estimate_memory
    from megatron_pr2.recipes.loader import load_recipe
    from megatron_pr2.recipes.models import shape_from_hf
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import training_steps
    from tests.support.hf_models import build_hf_model, save
    from tests.support.rl_data import dapo_rows, save_char_tokenizer, write_parquet

    hf_dir = save(build_hf_model("qwen3_moe", seed=3, vocab_size=128), tmp_path / "hf")
    tok = save_char_tokenizer(tmp_path / "tok")
    data = write_parquet(tmp_path / "d.parquet", dapo_rows([("1+1?", "2"), ("2+2?", "4")]))
    keys = [
        f"policy.precision={precision}",
        f"policy.use_distributed_optimizer={str(distributed).lower()}",
        "policy.router_replay.mode=r2",
    ]
    steps = training_steps(
        load_config(
            "examples/tiny/grpo_tiny.yaml",
            [
                *keys,
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
            ],
        )
    )
    next(steps)  # one GRPO step: Adam's state exists
    measured = _measured(steps.gi_frame.f_locals["worker"].setup)

    recipe = load_recipe(None, [f"model.hf_config={hf_dir}", *keys])
    shape = shape_from_hf(json.loads((hf_dir / "config.json").read_text()))
    est = estimate_memory(shape, Layout(world=1), recipe, "r2").device
    estimated = {
        "weights": est[f"weights ({'bf16' if precision == 'bfloat16' else 'fp32'})"],
        "grads": est["grads (fp32)"],
        "optimizer": est[f"optimizer (Adam, {'distributed' if distributed else 'replicated'})"],
    }
    for part, value in measured.items():
        assert value > 0, part
        assert estimated[part] == pytest.approx(value, rel=0.10), (part, estimated, measured)
