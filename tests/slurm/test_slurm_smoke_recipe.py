"""Real SLURM: the Qwen3-30B-A3B recipe's ``smoke`` variant through ``pr2 launch --executor
slurm --wait``: the recipe's own path (converted Qwen3-MoE checkpoint, HF tokenizer files,
DAPO-Math-schema parquet, math_verify, checkpoints, validation) as a batch job on the localhost
cluster of ``.ci/slurm.sh``. Skips without nemo-run or a live cluster (unless
``PR2_REQUIRE_SLURM=1``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")
pytest.importorskip("transformers")

from megatron_pr2.launch.spec import REPO_ROOT

RECIPE_DIR = REPO_ROOT / "examples" / "recipes" / "qwen3_30b_a3b"
JOB_TIMEOUT_S = 480.0


def test_smoke_variant_runs_as_a_slurm_job(slurm, megatron_world1, nemo_home: Path, tmp_path: Path):
    from megatron_pr2.convert.hf_to_mcore import hf_to_mcore
    from megatron_pr2.recipes.loader import load_recipe
    from megatron_pr2.recipes.smoke import make_smoke_assets

    recipes = tmp_path / "qwen3_30b_a3b"  # the smoke variant finds its assets beside the recipe
    shutil.copytree(RECIPE_DIR, recipes, ignore=shutil.ignore_patterns("smoke"))
    make_smoke_assets(
        load_recipe(recipes / "base.yaml"),
        recipes / "smoke",
        lambda hf, out: hf_to_mcore(hf, out, dtype="bfloat16", show_progress=False),
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    cmd = [
        sys.executable,
        "-c",
        "from megatron_pr2.cli import main; main()",
        "launch",
        str(recipes / "r2.yaml"),
        "--variant",
        "smoke",
        "--executor",
        "slurm",
        "--partition",
        "debug",
        "--account",
        "ci",
        "--time",
        "00:08:00",
        "--job-dir",
        str(nemo_home),
        "--job-name",
        "pr2-qwen-smoke",
        "--wait",
        "--timeout",
        str(JOB_TIMEOUT_S),
        f"logger.log_dir={tmp_path / 'logs'}",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600
    )
    logs = "\n".join(
        p.read_text(errors="replace")
        for p in sorted((nemo_home / "experiments" / "pr2-qwen-smoke").glob("*/train/log-*.out"))
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs[-4000:]
    assert ": SUCCEEDED" in done.stdout
    records = [
        json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2]
    assert "train/reward" in records[0] and "validation/accuracy" in records[1]
    assert (tmp_path / "ckpt" / "step_2").is_dir()
