"""The Qwen3-30B-A3B recipe's ``smoke`` variant under torchrun with EP2 (2 processes): the
recipe's own defaults (bf16, distributed optimizer, checkpoints, validation) train 2 GRPO steps
with math_verify rewards, checkpoint, and a relaunch resumes for a third step that equals an
uninterrupted run's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# recipe_dir: the module fixture that builds the smoke assets (imported: pytest finds it here)
from tests.unit.test_recipe_smoke import _answers, recipe_dir  # noqa: F401

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # three torchrun launches of 2 trainer processes

ROOT = Path(__file__).resolve().parents[2]


def _trainer_yaml(folder: Path, out: Path, mode: str) -> Path:
    """The recipe resolved as ``pr2 launch`` resolves it, at EP2, outputs under ``out``."""
    from megatron_pr2.recipes.loader import load_recipe, trainer_values

    overrides = [
        f"policy.router_replay.mode={mode}",
        "policy.expert_model_parallel_size=2",
        f"logger.log_dir={out / 'logs'}",
        "logger.progress_bar=false",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
    ]
    recipe = load_recipe(folder / "pr2.yaml", overrides, ("smoke",))
    values = trainer_values(recipe)
    assert values["policy"]["precision"] == "bfloat16"
    assert values["policy"]["use_distributed_optimizer"] is True
    assert values["data"]["reward"] == "math_verify"
    assert values["policy"]["expert_model_parallel_size"] == 2
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trainer.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _torchrun(config: Path, grades: Path, *overrides: str) -> subprocess.CompletedProcess:
    from tests.support.dist import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "tests.support.torchrun_trainer",
        str(config), str(grades), *overrides,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _grades(path: Path) -> list[tuple[str, str, float]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["pr2"])
def test_smoke_variant_under_torchrun_ep2_trains_checkpoints_and_resumes(
    world1,
    recipe_dir: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
):
    from megatron_pr2.rl.checkpoint import latest_checkpoint

    config = _trainer_yaml(recipe_dir, tmp_path, mode)
    first = _torchrun(config, tmp_path / "grades")
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["train/reward"] <= 1.0
        assert "train/router_replay/zero_deviation_ratio/layer_2/mini_step_1" in metrics
        assert "train/pr2/predictive_loss/mini_step_1" in metrics
    assert 0.0 <= history[1]["validation/accuracy"] <= 1.0
    # rewards are math_verify's grades of decoded responses against the parquet's answers
    grades = _grades(tmp_path / "grades" / "rank0.jsonl")
    assert len(grades) >= 2 * 2 * 4  # 2 steps x 2 prompts x 4 responses (+ validation)
    assert {answer for _, answer, _ in grades} <= _answers(recipe_dir)
    assert history[0]["train/reward"] == pytest.approx(sum(g for *_, g in grades[:8]) / 8)
    assert _grades(tmp_path / "grades" / "rank1.jsonl") == grades  # one rollout on both ranks
    for step in (1, 2):
        assert (tmp_path / "ckpt" / f"step_{step}" / "model" / "metadata.json").is_file()
    assert latest_checkpoint(tmp_path / "ckpt")[0] == 2, first.stdout[-2000:]

    resumed = _torchrun(config, tmp_path / "grades", "grpo.max_num_steps=3")
    assert "resumed from" in resumed.stdout and "(step 2)" in resumed.stdout, resumed.stdout
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    third = json.loads(lines[2])
    assert all(math.isfinite(v) for v in third.values())
    assert "validation/accuracy" in third  # the last step validates
    assert latest_checkpoint(tmp_path / "ckpt")[0] == 3

    # the resumed step is the uninterrupted run's step 3 (DP2 shards the distributed optimizer)
    reference = _trainer_yaml(recipe_dir, tmp_path / "reference", mode)
    _torchrun(reference, tmp_path / "reference" / "grades", "grpo.max_num_steps=3")
    lines = (tmp_path / "reference" / "logs" / "metrics.jsonl").read_text().splitlines()
    want, got = _comparable(json.loads(lines[2])), _comparable(third)
    assert got.keys() == want.keys()
    assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("timing/", "sft/"))}
