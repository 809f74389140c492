"""Where a run's metrics go: ``metrics.jsonl`` (always), TensorBoard and a progress bar.

Metric names follow NeMo-RL (``train/reward``, ``train/gen_kl_error``, ...); per-mini-step values
carry a ``/mini_step_{i}`` suffix. The JSONL file is the source of truth (``pr2 compare`` and
``pr2 analyze`` read it); TensorBoard gets the same scalars with the step as x axis.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from megatron_pr2.errors import MissingRunFileError, RunDirError

__all__ = ["RunLogger", "make_progress_bar", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every step's metrics of a run directory, in step order (last record wins per step)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise MissingRunFileError(f"{run_dir}: no {METRICS_FILE} (not a pr2 run directory?)")
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if "step" not in record:
            raise RunDirError(f"{path}:{number}: record has no 'step' key")
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


class RunLogger:
    """JSONL + optional TensorBoard + optional tqdm progress bar for one run.

    ``resume_step > 0`` (a resumed run): the file is appended to, so the history of the steps
    ``<= resume_step`` survives byte for byte; records of later steps (written after the
    checkpoint the run resumes from) and a line cut short by a kill are dropped first.
    ``resume_step == 0`` (a fresh run): an existing non-empty file belongs to an earlier run in
    the same ``log_dir``; it is renamed to ``metrics.jsonl.old-N`` (never erased, never mixed
    with the new run's records) and a line on stderr says so.
    """

    def __init__(
        self,
        log_dir: str | Path,
        total_steps: int,
        *,
        tensorboard: bool = False,
        progress_bar: bool = True,
        resume_step: int = 0,
        headline: dict[str, str] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / METRICS_FILE
        self.moved_aside: Path | None = None
        if resume_step > 0:
            _keep_history(self.path, resume_step)
        elif self.path.is_file() and self.path.stat().st_size > 0:
            self.moved_aside = _move_aside(self.path)
            print(
                f"{self.path}: a fresh run (no checkpoint to resume from) found metrics of an "
                f"earlier run; moved them to {self.moved_aside.name}",
                file=sys.stderr,
                flush=True,
            )
        self._file = self.path.open("a")
        self._tb = _tensorboard_writer(self.log_dir / "tensorboard") if tensorboard else None
        self._bar = make_progress_bar(total_steps, "grpo", resume_step) if progress_bar else None
        self.headline = headline or {}  # progress-bar label -> metric name

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()
        summary = {label: metrics.get(name) for label, name in self.headline.items()}
        if self._bar is not None:
            self._bar.set_postfix(
                {k: f"{v:.3f}" for k, v in summary.items() if isinstance(v, float)}, refresh=False
            )
            self._bar.update(1)
        else:
            parts = "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
            print(f"step {step}  {parts}", flush=True)

    def write(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_of(line: str) -> int | None:
    """The step of one JSONL line, or None for a blank, cut-short or step-less line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return int(step) if isinstance(step, (int, float)) else None


def _keep_history(path: Path, resume_step: int) -> None:
    """Prepare ``path`` for appending after ``resume_step``: untouched when every line is a
    record of a step ``<= resume_step``, else rewritten atomically (temporary file + rename, so
    a kill here leaves the old file) with those records only, in their original bytes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        step = _step_of(line)
        if step is not None and step <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.old-N`` (N = 1, 2, ...) and return it."""
    number = 1
    while (target := path.with_name(f"{path.name}.old-{number}")).exists():
        number += 1
    os.replace(path, target)
    return target


def _tensorboard_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "logger.tensorboard_enabled=true needs the `tensorboard` package "
            "(pip install tensorboard), or set logger.tensorboard_enabled=false"
        ) from err
    return SummaryWriter(log_dir=str(directory))


def make_progress_bar(total: int, desc: str, initial: int = 0) -> Any:
    """A tqdm bar on stderr, or None without tqdm (callers then print plain lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr)
