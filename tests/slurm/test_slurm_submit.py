"""Real SLURM: the tiny GRPO job (EP2: experts split over the two nodes) across 2 emulated
nodes x torchrun, through nemo-run's SlurmExecutor + LocalTunnel, and a deliberately failing
job that must be reported FAILED.

Needs the launch venv (nemo-run) and a live localhost cluster (``.ci/slurm.sh`` starts one with
``tools/slurm_local/slurm_local.sh``); skips otherwise, unless ``PR2_REQUIRE_SLURM=1``.
Job states come from ``Experiment.from_id(...).status()`` (nemo-run polls ``sacct``), never
from the launcher's exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")

from megatron_pr2.launch.nemo import job_status, launch, wait_for_job
from megatron_pr2.launch.spec import REPO_ROOT, cluster_from_section
from megatron_pr2.recipes.loader import load_recipe

RECIPE = REPO_ROOT / "examples" / "recipes" / "tiny" / "slurm_2nodes.yaml"
JOB_TIMEOUT_S = 480.0


def _sacct(job_id: str, fields: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "--parsable2", "-j", str(job_id), "-o", fields],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split("|")


def _submit_and_wait(home: Path, overrides: list[str], name: str) -> tuple[str, dict]:
    recipe = load_recipe(RECIPE, [*overrides, "cluster.time=00:10:00"])
    spec = cluster_from_section(recipe.section("cluster"), {"job_dir": str(home)})
    out = launch(recipe, spec, name=name, detach=True)
    try:
        status = wait_for_job(out.exp_id, home, timeout_s=JOB_TIMEOUT_S)
    except TimeoutError:
        job = job_status(out.exp_id, home).get("job_id")
        if job:
            subprocess.run(["scancel", str(job)], check=False)
        raise
    return status, job_status(out.exp_id, home)


def _job_log(home: Path, name: str) -> str:
    logs = sorted((home / "experiments" / name).glob("*/train/log-*.out"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def test_two_node_grpo_job(slurm, nemo_home: Path, tmp_path: Path):
    log_dir = tmp_path / "logs"
    status, state = _submit_and_wait(nemo_home, [f"logger.log_dir={log_dir}"], "pr2-tiny-2n")
    log = _job_log(nemo_home, "pr2-tiny-2n")
    assert status == "SUCCEEDED", log[-4000:]
    job_state, nodes, nodelist = _sacct(state["job_id"], "State,NNodes,NodeList")
    assert (job_state, nodes) == ("COMPLETED", "2"), nodelist
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]  # the logging rank writes each step once
    for record in records:
        assert "train/router_replay/zero_deviation_ratio" in record, sorted(record)
    # torchrun's agent on the second node joined the rendezvous: one world of 2 ranks
    assert "group_rank=1" in log and "global_ranks=[1]" in log
    assert "role_world_sizes=[2]" in log


def test_failing_job_is_reported_failed(slurm, nemo_home: Path, tmp_path: Path):
    """Through the CLI: the trainer refuses a context shorter than a prompt, the job exits
    non-zero, nemo-run reports FAILED and ``pr2 launch --wait`` exits 1."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-c",
        "from megatron_pr2.cli import main; main()",
        "launch",
        str(RECIPE),
        f"logger.log_dir={tmp_path / 'logs'}",
        "policy.max_total_sequence_length=3",
        "--job-dir",
        str(nemo_home),
        "--job-name",
        "pr2-tiny-fail",
        "--time",
        "00:05:00",
        "--wait",
        "--timeout",
        str(JOB_TIMEOUT_S),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert ": FAILED" in done.stdout, done.stdout[-3000:]
    job_id = next(
        line.split()[1]
        for line in done.stdout.splitlines()
        if line.startswith("experiment ") and ": FAILED" not in line
    )
    # a fresh Experiment.from_id may still say SUBMITTED for a moment: poll to the end state
    assert wait_for_job(job_id, nemo_home, timeout_s=120) == "FAILED"
    state = job_status(job_id, nemo_home)
    assert _sacct(state["job_id"], "State")[0] == "FAILED"
    assert "max_total_sequence_length" in _job_log(nemo_home, "pr2-tiny-fail")


def test_time_limit_is_reported_as_timeout(slurm, nemo_home: Path, tmp_path: Path):
    """A job killed at its time limit: ``pr2 launch --wait`` says TIMEOUT (sacct's state; nemo-run
    alone says FAILED), prints the job's log files and exits 1."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-c",
        "from megatron_pr2.cli import main; main()",
        "launch",
        str(RECIPE),
        "--job-dir",
        str(nemo_home),
        "--job-name",
        "pr2-tiny-timeout",
        "--time",
        "00:01:00",
        "--wait",
        "--timeout",
        str(JOB_TIMEOUT_S),
        f"logger.log_dir={tmp_path / 'logs'}",  # an override after the flags
        "grpo.max_num_steps=100000",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert ": TIMEOUT (job " in done.stdout, done.stdout[-3000:]
    logs = [line.split("log: ", 1)[1] for line in done.stdout.splitlines() if "  log: " in line]
    assert logs and all(Path(p).is_file() for p in logs), done.stdout[-3000:]
