"""Kill a GRPO run mid-way (SIGKILL), resume it from its checkpoint, and compare the resumed
steps' metrics with an uninterrupted run of the same config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_pr2.rl.checkpoint import latest_checkpoint
from megatron_pr2.rl.logger import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = "examples/tiny/grpo_tiny.yaml"

pytestmark = pytest.mark.slow  # three trainer processes


def _command(mode: str, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "examples/train.py",
        TINY,
        f"policy.router_replay.mode={mode}",
        f"grpo.max_num_steps={steps}",
        "grpo.sft_warmup_steps=4",
        "grpo.off_policy_steps=2",
        f"logger.log_dir={run_dir / 'logs'}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        "checkpointing.enabled=true",
        f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
        "checkpointing.save_period=2",
    ]


def _env() -> dict[str, str]:
    """This process's environment without its torch.distributed rendezvous (a world-1 run
    picks its own port)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("timing/", "sft/"))}


@pytest.mark.parametrize("mode", ["pr2"])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, mode):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(mode, killed, steps=1000),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches its children too
    )
    deadline = time.monotonic() + 600
    try:
        while latest_checkpoint(killed / "ckpt") is None:
            if proc.poll() is not None:
                pytest.fail(f"trainer exited before its first checkpoint:\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 600 s")
            time.sleep(0.05)
        # SIGKILL the whole group, as a node failure would: a worker process the trainer
        # started (megatron's checkpoint writer) must not outlive the test as an orphan.
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = latest_checkpoint(killed / "ckpt")
    assert saved is not None
    k = saved[0]
    total = k + 2

    resumed = subprocess.run(
        _command(mode, killed, steps=total), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved[1]} (step {k})" in resumed.stdout

    reference = tmp_path / "reference"
    fresh = subprocess.run(
        _command(mode, reference, steps=total), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    after_kill = read_metrics(killed / "logs")
    lines = (killed / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, total + 1))
    uninterrupted = read_metrics(reference / "logs")
    for step in (k + 1, k + 2):
        got, want = _comparable(after_kill[step - 1]), _comparable(uninterrupted[step - 1])
        assert got.keys() == want.keys()
        diffs = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
        assert not diffs, f"step {step} differs after resume: {diffs}"
