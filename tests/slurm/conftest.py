"""Fixtures for the nemo-run tests: a private nemo-run home and, for SLURM, a live controller.

``PR2_REQUIRE_SLURM=1`` (set by ``.ci/slurm.sh`` once its daemons are up) turns "no SLURM"
from a skip into a failure, so CI never passes by skipping the submission tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _stdin_devnull(monkeypatch):
    """nemo-run's tunnels run commands through invoke, which reads stdin; pytest's captured
    stdin raises on read, so give it an empty one (as in CI, which has no stdin)."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


@pytest.fixture
def nemo_home(tmp_path: Path) -> Path:
    home = tmp_path / "nemo_home"  # never a folder named nemo_run: see LaunchSpec.job_dir
    home.mkdir()
    return home


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (install slurm-client; see .ci/slurm.sh)"
    try:
        ping = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld is not reachable: {ping.stdout.strip()} {ping.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """A reachable slurmctld (tools/slurm_local/slurm_local.sh start), else skip (or fail)."""
    problem = _slurm_problem()
    if problem is None:
        return
    if os.environ.get("PR2_REQUIRE_SLURM") == "1":
        pytest.fail(f"PR2_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)
