"""The Qwen3-30B-A3B recipe's ``smoke`` variant on CPU: the recipe's own path (converted
checkpoint of the Qwen3-MoE architecture, HF tokenizer files, DAPO-Math-schema parquet,
math_verify, checkpoints, resume, validation) at toy size, world 1, in r2, pr2 and pr2_r3.

The assets are what ``pr2 smoke-assets`` writes, built once for the module next to a copy of
the recipe files (the smoke variant names them relative to the recipe)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = ROOT / "examples" / "recipes" / "qwen3_30b_a3b"


@pytest.fixture(scope="module")
def recipe_dir(megatron_world1, tmp_path_factory) -> Path:
    from megatron_pr2.convert.hf_to_mcore import hf_to_mcore
    from megatron_pr2.recipes.loader import load_recipe
    from megatron_pr2.recipes.smoke import make_smoke_assets

    folder = tmp_path_factory.mktemp("recipes") / "qwen3_30b_a3b"
    shutil.copytree(RECIPE_DIR, folder, ignore=shutil.ignore_patterns("smoke"))

    def convert(hf_dir: Path, mcore_dir: Path) -> None:
        hf_to_mcore(hf_dir, mcore_dir, dtype="bfloat16", show_progress=False)

    make_smoke_assets(load_recipe(folder / "base.yaml"), folder / "smoke", convert)
    return folder


def test_smoke_assets_have_the_recipes_architecture(recipe_dir: Path):
    """Qwen3-MoE as published (GQA, q/k norm, top-k renormalised), scaled down; the tokenizer
    travels with the conversion; the smoke variant passes check-recipe."""
    from megatron_pr2.recipes.check import check_recipe, format_result
    from megatron_pr2.recipes.loader import load_recipe

    hf = json.loads((recipe_dir / "smoke" / "hf" / "config.json").read_text())
    assert hf["model_type"] == "qwen3_moe" and hf["norm_topk_prob"] is True
    assert (hf["num_attention_heads"], hf["num_key_value_heads"]) == (4, 2)
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 4.x / 5.x
    assert (hf["num_hidden_layers"], experts, hf["num_experts_per_tok"]) == (2, 8, 2)
    described = json.loads((recipe_dir / "smoke" / "mcore" / "pr2_model.json").read_text())
    assert described["transformer_config"]["num_query_groups"] == 2
    assert (recipe_dir / "smoke" / "mcore" / "tokenizer.json").is_file()
    for variant in ("smoke", "tiny"):  # tiny: the README's main job, on the same assets
        recipe = load_recipe(recipe_dir / "pr2.yaml", variants=(variant,))
        result = check_recipe(recipe)
        assert result.ok, format_result(recipe, result)
        assert result.shape is not None and result.shape.num_layers == 2


def _config(recipe_dir: Path, mode_file: str, out: Path, *overrides: str):
    from megatron_pr2.recipes.loader import load_recipe, trainer_values
    from megatron_pr2.rl.config import config_from_dict

    outputs = [f"logger.log_dir={out / 'logs'}", f"checkpointing.checkpoint_dir={out / 'ckpt'}"]
    recipe = load_recipe(recipe_dir / mode_file, [*outputs, *overrides], ("smoke",))
    return config_from_dict(trainer_values(recipe))


@pytest.mark.parametrize(
    ("mode_file", "mode"), [("r2.yaml", "r2"), ("pr2.yaml", "pr2"), ("pr2.yaml", "pr2_r3")]
)
def test_smoke_variant_trains_checkpoints_resumes_and_validates(
    world1, recipe_dir: Path, tmp_path: Path, monkeypatch, mode_file: str, mode: str
):
    from megatron_pr2.rl import reward
    from megatron_pr2.rl.trainer import train

    graded: list[tuple[str, str, float]] = []
    real = reward.math_verify_reward

    def spy(response: str, answer: str) -> float:
        value = real(response, answer)
        graded.append((response, answer, value))
        return value

    monkeypatch.setattr(reward, "math_verify_reward", spy)
    keys = [f"policy.router_replay.mode={mode}"]
    config = _config(recipe_dir, mode_file, tmp_path, *keys)
    assert config.policy.model_path == str(recipe_dir / "smoke" / "mcore")
    assert config.checkpointing.enabled
    # the recipe's own defaults in every mode (the fp32 PR2 predictor included)
    assert config.policy.use_distributed_optimizer
    assert config.policy.precision == "bfloat16"
    history = train(config)
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert "train/router_replay/zero_deviation_ratio/layer_2/mini_step_1" in metrics
    if mode.startswith("pr2"):
        assert "train/pr2/predictive_loss/mini_step_1" in history[0]
    # every reward is math_verify's grade of a decoded response against the parquet's truth
    assert len(graded) >= 2 * 2 * 4  # 2 steps x 2 prompts x 4 responses (+ validation)
    assert {a for _, a, _ in graded} <= _answers(recipe_dir)
    first = graded[:8]
    assert history[0]["train/reward"] == pytest.approx(sum(v for *_, v in first) / 8)
    assert (tmp_path / "ckpt" / "step_1").is_dir() and (tmp_path / "ckpt" / "step_2").is_dir()
    assert "validation/accuracy" not in history[0]
    assert 0.0 <= history[1]["validation/accuracy"] <= 1.0
    assert history[1]["validation/num_prompts"] == 4.0  # max_val_samples of the smoke variant
    # every mode resumes: torch Adam in megatron's distributed optimizer (no TE/apex) could
    # not, in r2 either, before megatron_pr2.patch.distrib_optim
    resumed = train(_config(recipe_dir, mode_file, tmp_path, *keys, "grpo.max_num_steps=3"))
    assert [m["step"] for m in resumed] == [3]
    assert "validation/accuracy" in resumed[0]  # the last step validates too
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def _answers(recipe_dir: Path) -> set[str]:
    import pyarrow.parquet as pq

    out: set[str] = set()
    for name in ("train", "val"):
        table = pq.read_table(recipe_dir / "smoke" / "data" / f"{name}.parquet").to_pylist()
        out |= {row["reward_model"]["ground_truth"] for row in table}
    return out


def test_smoke_assets_refuse_an_architecture_convert_lacks(tmp_path: Path):
    """Moonlight (MLA attention): refused before anything is built, naming the reason."""
    from megatron_pr2.convert.errors import ConversionError
    from megatron_pr2.recipes.loader import load_recipe
    from megatron_pr2.recipes.smoke import make_smoke_assets

    recipe = load_recipe(ROOT / "examples" / "recipes" / "moonlight_16b_a3b" / "r2.yaml")
    with pytest.raises(ConversionError, match="multi-head latent attention"):
        make_smoke_assets(recipe, tmp_path / "smoke", lambda hf, out: None)
    assert not (tmp_path / "smoke").exists()


def test_smoke_config_keeps_the_architecture_flags():
    """OLMoE stays multi-head with un-renormalised top-k; its expert FFN is intermediate_size."""
    from megatron_pr2.recipes.models import KNOWN_HF_CONFIGS
    from megatron_pr2.recipes.smoke import SMOKE_POLICY_SHAPE, smoke_hf_config

    olmoe = smoke_hf_config(KNOWN_HF_CONFIGS["allenai/OLMoE-1B-7B-0924"])
    assert olmoe["model_type"] == "olmoe" and olmoe["norm_topk_prob"] is False
    assert olmoe["num_attention_heads"] == olmoe["num_key_value_heads"] == 4
    assert olmoe["intermediate_size"] == 16 and olmoe["num_hidden_layers"] == 2
    assert SMOKE_POLICY_SHAPE["num_layers"] == olmoe["num_hidden_layers"]


@pytest.mark.parametrize("model_dir", ["qwen3_30b_a3b", "olmoe_1b_7b", "moonlight_16b_a3b"])
def test_every_recipe_has_a_smoke_variant_of_the_smoke_sizes(model_dir: str):
    from megatron_pr2.recipes.loader import load_recipe
    from megatron_pr2.recipes.smoke import SMOKE_POLICY_SHAPE

    base = ROOT / "examples" / "recipes" / model_dir
    smoke = load_recipe(base / "base.yaml").values["variants"]["smoke"]
    assert {k: smoke[f"policy.{k}"] for k in SMOKE_POLICY_SHAPE} == SMOKE_POLICY_SHAPE
    assert smoke["model.checkpoint"] == str(base / "smoke" / "mcore")
    assert smoke["cluster.gpus_per_node"] == 0 and smoke["grpo.max_num_steps"] == 2
