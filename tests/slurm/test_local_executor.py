"""nemo-run LocalExecutor: torchrun x 2 processes on this machine, as ``pr2 launch --executor
local`` runs them. Needs the launch venv (nemo-run); no SLURM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

run = pytest.importorskip("nemo_run")

from megatron_pr2.launch.nemo import build_executor, job_status, launch, use_nemo_run_home  # noqa: E402
from megatron_pr2.launch.spec import REPO_ROOT, LaunchSpec, cluster_from_section  # noqa: E402
from megatron_pr2.recipes.loader import load_recipe  # noqa: E402

ALL_REDUCE = """\
import os

import torch
import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    with open(os.path.join(os.environ["OUT_DIR"], f"rank{dist.get_rank()}.txt"), "w") as f:
        f.write(f"{dist.get_world_size()} {value.item()}")
    dist.destroy_process_group()
"""


@pytest.fixture(autouse=True)
def _venv_on_path(monkeypatch):
    """torchx starts ``torchrun`` from PATH: the interpreter's venv must come first."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_torchrun_two_processes(nemo_home: Path, tmp_path: Path):
    """The executor pr2 launch builds gives a real world-2 gloo group."""
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    use_nemo_run_home(nemo_home)
    spec = LaunchSpec(executor="local", gpus_per_node=0, nproc_per_node=2, rdzv_port=29531)
    spec.env["OUT_DIR"] = str(tmp_path)
    executor = build_executor(spec, nemo_home, "ar")
    with run.Experiment("ar", executor=executor, log_level="WARN") as exp:
        exp.add(run.Script(path=str(script), entrypoint="python"), name="train")
        exp.run(sequential=True, detach=False, tail_logs=False)
        exp_id = exp._id
    assert job_status(exp_id, nemo_home)["status"] == "SUCCEEDED"
    results = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert results == ["2 3.0", "2 3.0"]


def test_tiny_grpo_two_processes(nemo_home: Path, tmp_path: Path):
    """examples/train.py under torchrun x 2 (data parallel 2) via the LocalExecutor."""
    log_dir = tmp_path / "logs"
    recipe = load_recipe(
        REPO_ROOT / "examples" / "recipes" / "tiny" / "local_2procs.yaml",
        [f"logger.log_dir={log_dir}"],
    )
    spec = cluster_from_section(recipe.section("cluster"), {"job_dir": str(nemo_home)})
    out = launch(recipe, spec, name="pr2-tiny-local", detach=False)
    state = job_status(out.exp_id, nemo_home)
    logs = "\n".join(
        p.read_text(errors="replace") for p in (nemo_home / "experiments").rglob("*.log")
    )
    assert state["status"] == "SUCCEEDED", logs[-4000:]
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_relaunch_resumes_from_the_first_launch(nemo_home: Path):
    """Two ``pr2 launch``-es of one experiment share ``<job_dir>/runs/<name>``: the second
    finds the first one's checkpoint, resumes at step 1 and appends to its metrics.jsonl
    (nothing overridden to an absolute path: the recipe's relative log_dir and the trainer's
    default checkpoint_dir are what a user launches with)."""
    path = REPO_ROOT / "examples" / "recipes" / "tiny" / "local_2procs.yaml"
    common = ["checkpointing.enabled=true", "checkpointing.save_period=1"]
    outs = []
    for steps in (1, 2):
        recipe = load_recipe(path, [*common, f"grpo.max_num_steps={steps}"])
        spec = cluster_from_section(recipe.section("cluster"), {"job_dir": str(nemo_home)})
        outs.append(launch(recipe, spec, name="pr2-tiny-resume", detach=False))
        logs = "\n".join(
            p.read_text(errors="replace")
            for p in (nemo_home / "experiments").rglob("*.log")
            if outs[-1].exp_id in str(p)
        )
        assert job_status(outs[-1].exp_id, nemo_home)["status"] == "SUCCEEDED", logs[-4000:]
    assert "resumed from" in logs and "(step 1)" in logs, logs[-4000:]
    run_dir = nemo_home / "runs" / "pr2-tiny-resume"
    assert sorted(p.name for p in (run_dir / "results" / "grpo").glob("step_*")) == [
        "step_1",
        "step_2",
    ]
    lines = (run_dir / "logs" / "tiny_local" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
