"""Trainer checkpoints: megatron dist checkpoint (model + optimizer) plus the loop's own state.

Layout under ``checkpointing.checkpoint_dir``::

    step_{N}/model/               megatron torch_dist checkpoint (any parallel layout loads it)
    step_{N}/trainer_state.json   step, RNG states of prompt sampling and generation

A checkpoint is written into ``step_{N}.tmp`` and renamed when complete, so a run killed while
saving leaves no directory that looks complete; ``latest_checkpoint`` ignores ``*.tmp``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.models.training import TrainingSetup, load_checkpoint, save_checkpoint

__all__ = [
    "capture_rng",
    "latest_checkpoint",
    "load_trainer_checkpoint",
    "restore_rng",
    "save_trainer_checkpoint",
]

STATE_FILE = "trainer_state.json"
STEP_PREFIX = "step_"


def capture_rng(rng: random.Random, sampler: torch.Generator) -> dict[str, Any]:
    """JSON-able RNG states: prompts (``rng``), token sampling (``sampler``), torch's global."""
    version, internal, gauss = rng.getstate()
    return {
        "python": [version, list(internal), gauss],
        "sampler": sampler.get_state().tolist(),
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict[str, Any], rng: random.Random, sampler: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))
    sampler.set_state(torch.tensor(state["sampler"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_checkpoint(checkpoint_dir: str | Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the newest complete checkpoint, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        suffix = path.name[len(STEP_PREFIX) :]
        if path.name.startswith(STEP_PREFIX) and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found) if found else None


def save_trainer_checkpoint(
    setup: TrainingSetup,
    checkpoint_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Save model, optimizer and ``trainer_state`` as ``step_{step}``; collective over ranks.
    ``keep_last``: then delete all but the newest ``keep_last`` checkpoints."""
    root = Path(checkpoint_dir)
    final = root / f"{STEP_PREFIX}{step}"
    tmp = root / f"{STEP_PREFIX}{step}.tmp"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_checkpoint(setup, tmp / "model")
    _barrier()
    if _is_rank0():
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep_last is not None:
            steps = sorted(
                int(p.name[len(STEP_PREFIX) :])
                for p in root.iterdir()
                if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
            )
            for old in steps[:-keep_last]:
                shutil.rmtree(root / f"{STEP_PREFIX}{old}", ignore_errors=True)
    _barrier()
    return final


def load_trainer_checkpoint(setup: TrainingSetup, path: str | Path) -> dict[str, Any]:
    """Load model and optimizer in place; return the trainer state saved with them."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; not a complete trainer checkpoint")
    load_checkpoint(setup, path / "model")
    return json.loads(state_file.read_text())
