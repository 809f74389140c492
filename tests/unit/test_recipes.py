"""Recipes and ``pr2 check-recipe``: every shipped recipe passes, broken ones fail clearly.

Model shapes never come from a download: the checks read the built-in facts of the published
configs, or a ``config.json`` written here from the same hyper-parameters (a tiny stand-in keeps
the head/expert/layer counts that the parallel checks look at and shrinks the widths).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_pr2.recipes.check import (
    GIB,
    Layout,
    check_recipe,
    estimate_activations,
    estimate_memory,
    format_result,
)
from megatron_pr2.recipes.loader import RecipeError, load_recipe, trainer_values
from megatron_pr2.recipes.models import KNOWN_HF_CONFIGS, shape_from_hf

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"
MODEL_DIRS = ("qwen3_30b_a3b", "olmoe_1b_7b", "moonlight_16b_a3b")
MODE_FILES = [RECIPES / d / f"{m}.yaml" for d in MODEL_DIRS for m in ("r2", "r3", "pr2")]
ALL_FILES = sorted(RECIPES.glob("*/*.yaml"))


def _variants(path: Path) -> list[str]:
    return sorted((load_recipe(path).values.get("variants") or {}).keys())


def _check(path: Path, *overrides: str, variants: tuple[str, ...] = ()):
    """Shape, layout and memory checks; the shipped recipes' weights are not converted here
    (that refusal: test_recipe_weights.py)."""
    recipe = load_recipe(path, overrides, variants)
    return recipe, check_recipe(recipe, missing_weights="warn")


def test_every_model_ships_the_three_modes():
    # pr2.yaml is the paper's PR2: the engine samples under the predicted routes (pr2_r3)
    expected = {"r2": "r2", "r3": "r3", "pr2": "pr2_r3"}
    for path in MODE_FILES:
        recipe = load_recipe(path)
        assert recipe.get("policy.router_replay.mode") == expected[path.stem], path


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_passes(path: Path):
    recipe, result = _check(path)
    assert result.ok, format_result(recipe, result)
    assert result.memory is not None and result.memory.device_total > 0


@pytest.mark.parametrize(
    ("path", "variant"),
    # smoke and tiny run on the smoke assets: test_recipe_smoke checks them
    [(p, v) for p in MODE_FILES for v in _variants(p) if v not in ("smoke", "tiny")],
    ids=lambda x: x if isinstance(x, str) else f"{x.parent.name}/{x.stem}",
)
def test_every_variant_passes(path: Path, variant: str):
    recipe, result = _check(path, variants=(variant,))
    assert result.ok, format_result(recipe, result)


def test_qwen_paper_setup():
    """64 x 8, 16K responses, off-2/4/8 at lr 2e-6/1.5e-6/1e-6, clip 0.2/0.28, kl_post, 1e3,
    TP1/PP1/EP8 on 4 nodes x 8 GPUs; nodes8: a TP/PP/EP layout on 64 GPUs."""
    path = RECIPES / "qwen3_30b_a3b" / "pr2.yaml"
    recipe = load_recipe(path)
    assert recipe.get("grpo.num_prompts_per_step") == 64
    assert recipe.get("grpo.num_generations_per_prompt") == 8
    assert recipe.get("generation.max_new_tokens") == 16384
    assert recipe.get("loss_fn.ratio_clip_min") == 0.2
    assert recipe.get("loss_fn.ratio_clip_max") == 0.28
    assert recipe.get("loss_fn.reference_policy_kl_penalty") == 0.0
    assert recipe.get("policy.router_replay.predictor.loss_type") == "kl_post"
    assert recipe.get("policy.router_replay.predictor.lr_mult") == 1000.0
    assert (recipe.get("cluster.nodes"), recipe.get("cluster.gpus_per_node")) == (4, 8)
    assert recipe.get("policy.tensor_model_parallel_size") == 1
    assert recipe.get("policy.pipeline_model_parallel_size") == 1
    assert recipe.get("policy.expert_model_parallel_size") == 8
    for variant, kappa, lr in (("off2", 2, 2e-6), ("off4", 4, 1.5e-6), ("off8", 8, 1e-6)):
        r = load_recipe(path, (), (variant,))
        assert (r.get("grpo.off_policy_steps"), float(r.get("policy.lr"))) == (kappa, lr)
    _, result = _check(path, variants=("off8", "nodes8"))
    assert result.ok
    lay = result.layout
    assert (lay.world, lay.tp, lay.pp, lay.ep, lay.dp) == (64, 2, 2, 8, 16)


def test_trainer_sees_no_launch_sections():
    recipe = load_recipe(RECIPES / "qwen3_30b_a3b" / "pr2.yaml")
    values = trainer_values(recipe, strict=False)
    assert not {"model", "cluster", "variants", "defaults"} & set(values)
    assert values["data"]["dataset"] == "DAPO-Math-17K"  # data: is trainer config
    from megatron_pr2.rl.config import config_from_dict

    config = config_from_dict(values)
    assert config.policy.router_replay.mode == "pr2_r3"


# ------------------------------------------------------------------ model shapes
def test_published_parameter_counts():
    """Totals match the published sizes: 30.5 B, 6.9 B, 16 B; PR2 predictor 12.6 M for Qwen3."""
    qwen = shape_from_hf(KNOWN_HF_CONFIGS["Qwen/Qwen3-30B-A3B"])
    olmoe = shape_from_hf(KNOWN_HF_CONFIGS["allenai/OLMoE-1B-7B-0924"])
    moon = shape_from_hf(KNOWN_HF_CONFIGS["moonshotai/Moonlight-16B-A3B"])
    assert qwen.total_params() == pytest.approx(30.5e9, rel=0.01)
    assert olmoe.total_params() == pytest.approx(6.92e9, rel=0.01)
    assert moon.total_params() == pytest.approx(16.0e9, rel=0.01)
    assert qwen.predictor_params() == 48 * 2048 * 128
    assert (moon.num_layers, moon.moe_layers, moon.num_experts, moon.topk) == (27, 26, 64, 6)


def _write_hf(tmp_path: Path, cfg: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("model_dir", MODEL_DIRS)
def test_hf_config_file_gives_the_same_result(tmp_path: Path, model_dir: str):
    """A config.json with the published hyper-parameters reproduces the built-in check."""
    path = RECIPES / model_dir / "pr2.yaml"
    name = load_recipe(path).get("model.name")
    hf = _write_hf(tmp_path, KNOWN_HF_CONFIGS[name])
    _, builtin = _check(path)
    _, from_file = _check(path, f"model.hf_config={tmp_path}")  # a folder holding config.json
    assert from_file.ok and from_file.shape_source == str(hf)
    assert from_file.shape == builtin.shape
    assert from_file.memory.device == builtin.memory.device


def test_tiny_stand_in_config(tmp_path: Path):
    """Shrunk widths, same counts: passes, and the estimate shrinks with the widths."""
    cfg = dict(KNOWN_HF_CONFIGS["Qwen/Qwen3-30B-A3B"])
    cfg.update(hidden_size=64, moe_intermediate_size=32, intermediate_size=96, head_dim=8)
    cfg.update(vocab_size=512)
    _write_hf(tmp_path, cfg)
    path = RECIPES / "qwen3_30b_a3b" / "pr2.yaml"
    recipe, result = _check(path, f"model.hf_config={tmp_path}", "policy.hidden_size=64")
    assert not result.ok  # policy.ffn_hidden_size still says 768
    assert any("policy.ffn_hidden_size=768 does not match" in e for e in result.errors)
    recipe, result = _check(
        path, f"model.hf_config={tmp_path}", "policy.hidden_size=64", "policy.ffn_hidden_size=32"
    )
    assert result.ok, format_result(recipe, result)
    assert result.memory.device["weights (bf16)"] < 0.05 * GIB


# ------------------------------------------------------------------ broken recipes
QWEN = RECIPES / "qwen3_30b_a3b" / "pr2.yaml"
MOON = RECIPES / "moonlight_16b_a3b" / "r2.yaml"
OLMOE = RECIPES / "olmoe_1b_7b" / "r3.yaml"


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (
            QWEN,
            ("policy.expert_model_parallel_size=5", "cluster.nodes=5"),
            "policy.expert_model_parallel_size=5 does not divide the 128 routed experts",
        ),
        (
            QWEN,
            ("policy.tensor_model_parallel_size=8",),
            "does not divide the 4 key/value heads",
        ),
        (
            OLMOE,
            ("policy.tensor_model_parallel_size=3", "cluster.gpus_per_node=6"),
            "policy.tensor_model_parallel_size=3 does not divide the 16 attention heads",
        ),
        (
            MOON,
            ("policy.pipeline_model_parallel_size=2",),
            "pipeline stages PP*VPP = 2 do not divide the 27 layers",
        ),
        (
            QWEN,
            ("policy.pipeline_model_parallel_size=3",),
            "world size 32 is not divisible by TP*PP*CP = 1*3*1",
        ),
        (
            QWEN,
            ("policy.tensor_model_parallel_size=2", "policy.sequence_parallel=false"),
            "needs policy.sequence_parallel=true",
        ),
        (QWEN, ("policy.num_moe_experts=64",), "policy.num_moe_experts=64 does not match"),
        (
            QWEN,
            ("policy.max_total_sequence_length=65536",),
            "exceeds the model's max_position_embeddings (40960)",
        ),
        (
            QWEN,
            ("cluster.nodes=16", "grpo.off_policy_steps=8", "policy.lr=1e-6"),
            "does not split into whole micro-batches of 1 over DP=128",
        ),
        (
            QWEN,
            ("policy.expert_model_parallel_size=1", "cluster.gpu_memory_gb=80"),
            "exceeds cluster.gpu_memory_gb=80",
        ),
        (QWEN, ("cluster.gpus=8",), "unknown config key 'cluster.gpus'"),
        (QWEN, ("policy.nmu_layers=48",), "unknown config key 'policy.nmu_layers'"),
        (QWEN, ("model.name=nobody/Unknown-MoE",), "has no built-in shape"),
    ],
)
def test_broken_recipe_fails_with_a_clear_message(path, overrides, message):
    recipe, result = _check(path, *overrides)
    assert not result.ok
    assert any(message in e for e in result.errors), result.errors
    assert "FAILED" in format_result(recipe, result)


def test_recipe_file_errors(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "c.yaml")
    with pytest.raises(RecipeError, match="unknown variant 'off3'"):
        load_recipe(QWEN, (), ("off3",))


def test_defaults_merge_deep(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"policy": {"lr": 1.0, "router_replay": {"mode": "r2"}}, "grpo": {}})
    )
    (tmp_path / "top.yaml").write_text(
        "defaults: base.yaml\npolicy:\n  router_replay:\n    mode: r3\n"
    )
    recipe = load_recipe(tmp_path / "top.yaml", ("policy.lr=2.0",))
    assert recipe.values["policy"] == {"lr": 2.0, "router_replay": {"mode": "r3"}}


# ------------------------------------------------------------------ memory formulas
def test_memory_estimate_by_hand():
    """Qwen3 paper layout (W=32, TP1 PP1 EP8): the docstring's formulas, recomputed here."""
    _, result = _check(QWEN)
    shape, lay, mem = result.shape, result.layout, result.memory
    assert (lay.dp, lay.edp) == (32, 4)
    experts = 48 * (128 // 8) * 3 * 2048 * 768
    dense = shape.non_expert_params()
    assert mem.device["weights (bf16)"] == pytest.approx(2 * (dense + experts))
    assert mem.device["grads (fp32)"] == pytest.approx(4 * (dense + experts))
    assert mem.device["optimizer (Adam, distributed)"] == pytest.approx(
        12 * (dense / 32 + experts / 4)
    )
    pred = 48 * 2048 * 128
    assert mem.device["predictor (fp32 + grad + Adam)"] == pytest.approx(8 * pred + 8 * pred / 32)
    tokens = math.ceil(64 * 8 * 18432 / 32)
    assert mem.tokens_per_rank == tokens
    assert mem.device["route payloads (int64)"] == tokens * 48 * 8 * 8
    assert mem.host["feature cache"] == math.ceil(0.03 * tokens) * 48 * (2048 + 128) * 2
    # the layout and the mode move the right terms
    r3 = load_recipe(RECIPES / "qwen3_30b_a3b" / "r3.yaml")
    est = estimate_memory(shape, lay, r3, "r3")
    assert "predictor (fp32 + grad + Adam)" not in est.device
    assert est.host["engine route payloads"] == tokens * 48 * 8 * 1  # int8 holds ids < 128
    assert 30 * GIB < mem.device_total < 45 * GIB


def test_cli_exit_codes(capsys, tmp_path):
    from megatron_pr2.commands import check_recipe as command

    (tmp_path / "pr2_model.json").write_text("{}")  # stands in for converted weights
    parser_args = type("A", (), {})
    ok = parser_args()
    ok.recipe, ok.overrides, ok.variant = str(QWEN), [f"model.checkpoint={tmp_path}"], ["off4"]
    ok.nodes = ok.gpus_per_node = None
    assert command.run(ok) == 0
    assert "OK" in capsys.readouterr().out
    bad = parser_args()
    bad.recipe, bad.overrides, bad.variant = str(QWEN), ["policy.expert_model_parallel_size=3"], []
    bad.nodes, bad.gpus_per_node = 3, None
    assert command.run(bad) == 1
    err = capsys.readouterr().err
    assert "does not divide the 128 routed experts" in err and "FAILED" in err


def test_activation_and_logits_estimate_by_hand():
    """Qwen3-30B-A3B, one 18K-token sequence per micro-batch, TP1/PP1/CP1: the formulas of
    ``estimate_activations``' docstring, recomputed here; on 80 GB the step does not fit
    without recompute (a warning naming the recompute total), while the static part does."""
    recipe, result = _check(
        QWEN, "cluster.gpu_memory_gb=80", "policy.activation_checkpointing=false"
    )
    assert result.ok, format_result(recipe, result)
    act = result.memory.activations
    t, h, a, n, k, i, v = 18432, 2048, 32, 128, 8, 768, 151936
    q, kv, o = 32 * 128, 2 * 4 * 128, 32 * 128
    attention = t * 4 * h + t * (2 * (q + kv + o) + 4 * a)
    moe = t * 4 * h + t * 8 * n + k * t * (4 * h + 6 * i)
    assert act.per_layer == pytest.approx(attention + moe)
    assert 2 * GIB < act.per_layer < 3 * GIB  # "2-3 GB per layer"
    assert (act.micro_batch_tokens, act.layers, act.in_flight) == (t, 48, 1)
    assert act.without_recompute == pytest.approx(48 * act.per_layer)
    assert act.with_recompute == pytest.approx(48 * t * 2 * h + act.per_layer)
    assert act.logits == t * v * 4 * 2  # fp32 logits ~11 GB, plus the fp32 softmax copy
    mem = result.memory
    assert mem.peak(False) == pytest.approx(mem.device_total + act.without_recompute + act.logits)
    assert mem.peak(True) < 80 * GIB < mem.peak(False)
    assert any(
        "exceeds cluster.gpu_memory_gb=80 (no recompute)" in w and "(fits)" in w
        for w in result.warnings
    ), result.warnings
    report = format_result(recipe, result)
    for label in ("weights (bf16)", "grads (fp32)", "optimizer", "no recompute", "logits"):
        assert label in report, report
    _, roomy = _check(QWEN, "cluster.gpu_memory_gb=1000")
    assert not [w for w in roomy.warnings if "exceeds" in w]
    # the trainer's full recompute switch: the recompute total is the one checked
    _, recomputed = _check(QWEN, "cluster.gpu_memory_gb=80", "policy.activation_checkpointing=true")
    assert not [w for w in recomputed.warnings if "exceeds" in w], recomputed.warnings
    _, tight = _check(QWEN, "cluster.gpu_memory_gb=60", "policy.activation_checkpointing=true")
    assert any("(full recompute)" in w for w in tight.warnings), tight.warnings


def test_activation_estimate_divides_by_the_layout():
    """TP splits the heads and the vocabulary, SP the rest, CP the sequence, PP the layers
    (with PP micro-batches in flight under 1F1B)."""
    _, base = _check(QWEN)
    _, split = _check(QWEN, variants=("off8", "nodes8"))  # TP2 PP2 EP8 ETP1 SP, 64 GPUs
    one, two = base.memory.activations, split.memory.activations
    assert (two.layers, two.in_flight) == (24, 2)
    assert two.logits == pytest.approx(one.logits / 2)
    # every term halves under TP2 + SP, except the ETP1 experts' own share (k x T/2 x 4H...)
    assert one.per_layer / 2 <= two.per_layer < one.per_layer
    # CP (refused by this trainer, so straight to the formula): half the tokens per rank
    recipe = load_recipe(QWEN)
    cp = estimate_activations(base.shape, Layout(world=32, ep=8, cp=2), recipe)
    assert cp.micro_batch_tokens == 18432 // 2
    assert cp.logits == pytest.approx(one.logits / 2)
    assert cp.per_layer == pytest.approx(one.per_layer / 2)


def test_model_section_sets_the_trainers_model_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: x\n  checkpoint: /ckpt/x-mcore\n  hf_path: /hf/x\n")
    assert trainer_values(load_recipe(recipe))["policy"]["model_path"] == "/ckpt/x-mcore"
    smoke = load_recipe(recipe, ["model.random_init=true"])
    policy = trainer_values(smoke)["policy"]
    assert policy == {"random_init_from": "/hf/x"}
    explicit = load_recipe(recipe, ["policy.model_path=/other"])
    assert trainer_values(explicit)["policy"]["model_path"] == "/other"
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  name: x\n  random_init: true\n")
    with pytest.raises(RecipeError, match=r"model\.hf_path or model\.hf_config"):
        trainer_values(load_recipe(bare))


def test_input_paths_resolve_against_the_file_that_sets_them(tmp_path, monkeypatch):
    """Checkpoint and data paths mean the same files from any working directory (a job runs
    elsewhere); output folders stay relative (they resolve in the job dir)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "model:\n  checkpoint: w/mcore\n  hf_path: /abs/hf\n"
        "data:\n  train_files: [d/a.parquet, /abs/b.parquet]\n"
        "variants:\n  smoke: {data.val_files: s/v.parquet}\n"
        "logger:\n  log_dir: logs/x\n"
    )
    (tmp_path / "sub" / "r.yaml").write_text("defaults: [../base.yaml]\n")
    monkeypatch.chdir(tmp_path / "sub")
    recipe = load_recipe(tmp_path / "sub" / "r.yaml", ["policy.tokenizer.name=tok"], ["smoke"])
    assert recipe.get("model.checkpoint") == str(tmp_path / "w" / "mcore")
    assert recipe.get("model.hf_path") == "/abs/hf"
    assert recipe.get("data.train_files") == [str(tmp_path / "d" / "a.parquet"), "/abs/b.parquet"]
    assert recipe.get("data.val_files") == str(tmp_path / "s" / "v.parquet")
    assert recipe.get("policy.tokenizer.name") == str(tmp_path / "sub" / "tok")  # from the cwd
    assert recipe.get("logger.log_dir") == "logs/x"


def test_pipeline_parallel_layout_warns_that_rollouts_lose_the_kv_cache():
    """nodes8 (PP2) generates with the recompute fallback: said, with the way out."""
    _, plain = _check(QWEN)
    assert not any("KV cache" in w for w in plain.warnings), plain.warnings
    recipe, result = _check(QWEN, variants=("nodes8",))
    assert result.ok, format_result(recipe, result)
    assert any("PP=2" in w and "generation.backend=vllm" in w for w in result.warnings)


def test_trainer_entry_points_run_a_recipe_with_its_variant(tmp_path: Path):
    """examples/train.py and ``pr2 train`` take a recipe and ``--variant`` (the README's main
    job); a plain trainer config still loads as before and refuses variants by name."""
    from megatron_pr2.errors import ConfigError
    from megatron_pr2.recipes.loader import run_config

    recipe = ROOT / "examples" / "recipes" / "qwen3_30b_a3b" / "pr2.yaml"
    tiny = run_config(recipe, ["grpo.seed=7"], ["tiny"])
    assert tiny.policy.router_replay.mode == "pr2_r3"  # the mode file over base.yaml
    assert (tiny.grpo.max_num_steps, tiny.grpo.off_policy_steps, tiny.grpo.seed) == (60, 4, 7)
    assert tiny.policy.model_path == str(recipe.parent / "smoke" / "mcore")
    assert tiny.data.train_files == str(recipe.parent / "smoke" / "data" / "train.parquet")
    assert tiny.data.reward == "math_verify"
    assert run_config(recipe).grpo.max_num_steps == 270  # no variant: the paper's run
    with pytest.raises(ConfigError, match=r"unknown variant 'tiny2'.*smoke.*tiny"):
        run_config(recipe, (), ["tiny2"])
    # pr2 train's command line: --variant and key=value overrides in any order
    from megatron_pr2.cli import build_parser

    args = build_parser().parse_args(["train", str(recipe), "--variant", "tiny", "grpo.seed=7"])
    assert (args.variant, args.overrides) == (["tiny"], ["grpo.seed=7"])
    plain = ROOT / "examples" / "tiny" / "grpo_off4.yaml"
    assert run_config(plain, ["grpo.seed=3"]).grpo.seed == 3
    with pytest.raises(ConfigError, match=r"trainer config, not a recipe.*tiny"):
        run_config(plain, (), ["tiny"])
