"""``metrics.jsonl`` across runs in one ``log_dir``: a resumed run appends to its history, a
fresh run never erases or mixes with an earlier run's records."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_pr2.rl.logger import METRICS_FILE, RunLogger, read_metrics


def _log(log_dir: Path, steps: range, resume_step: int = 0, value: float = 0.0) -> RunLogger:
    with RunLogger(log_dir, 10, progress_bar=False, resume_step=resume_step) as logger:
        for step in steps:
            logger.log({"step": step, "train/reward": value})
    return logger


def test_resume_appends_and_keeps_history_bytes(tmp_path: Path):
    """Earlier lines stay byte for byte (the file is appended to, not re-serialised); records
    written after the checkpoint (step 3) and a line cut short by a kill are dropped."""
    path = tmp_path / METRICS_FILE
    history = '{"step":1,"train/reward":0.5}\n{"step":2,"train/reward":0.25}\n'
    path.write_text(history + '{"step": 3, "train/reward": 9}\n{"step": 4, "tra')
    _log(tmp_path, range(3, 5), resume_step=2, value=1.0)
    text = path.read_text()
    assert text.startswith(history)
    assert [(m["step"], m["train/reward"]) for m in read_metrics(tmp_path)] == [
        (1, 0.5),
        (2, 0.25),
        (3, 1.0),
        (4, 1.0),
    ]
    assert len(text.splitlines()) == 4
    assert not list(tmp_path.glob("*.old-*")) and not list(tmp_path.glob("*.tmp"))


def test_resume_with_nothing_to_drop_leaves_the_file_alone(tmp_path: Path):
    path = tmp_path / METRICS_FILE
    _log(tmp_path, range(1, 3))
    inode = path.stat().st_ino
    _log(tmp_path, range(3, 4), resume_step=2)
    assert path.stat().st_ino == inode  # appended in place, not rewritten
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_fresh_run_moves_an_earlier_runs_metrics_aside(tmp_path: Path, capsys):
    """No checkpoint to resume from: the old records are kept in ``metrics.jsonl.old-N`` and the
    new file holds the new run's records only (no silent mix, no silent loss)."""
    path = tmp_path / METRICS_FILE
    _log(tmp_path, range(1, 4), value=0.1)
    old = path.read_text()
    first = _log(tmp_path, range(1, 2), value=0.2)
    assert first.moved_aside == tmp_path / f"{METRICS_FILE}.old-1"
    assert first.moved_aside.read_text() == old
    assert [(m["step"], m["train/reward"]) for m in read_metrics(tmp_path)] == [(1, 0.2)]
    assert "moved them to metrics.jsonl.old-1" in capsys.readouterr().err
    second = _log(tmp_path, range(1, 2), value=0.3)
    assert second.moved_aside == tmp_path / f"{METRICS_FILE}.old-2"
    assert json.loads(second.moved_aside.read_text())["train/reward"] == 0.2


def test_fresh_run_in_a_new_dir_moves_nothing(tmp_path: Path):
    logger = _log(tmp_path / "new", range(1, 2))
    assert logger.moved_aside is None
    assert [m["step"] for m in read_metrics(tmp_path / "new")] == [1]
