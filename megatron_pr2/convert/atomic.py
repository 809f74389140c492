"""Atomic output directories and cross-rank error agreement.

Output goes to a hidden sibling directory (same filesystem, so the final ``rename`` is atomic)
and is renamed onto the target only after every rank finished; on any failure the partial
directory is removed. Ranks agree on failures before collective steps, so one rank's bad
tensor fails every rank with the same message instead of leaving the others in a collective.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from megatron_pr2.convert.errors import ConversionError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank had ``error`` (first rank's message)."""
    message = None if error is None else f"{error}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    else:
        failed = [(0, message)] if message is not None else []
    if failed:
        if error is not None:
            raise error
        rank, text = failed[0]
        raise ConversionError(f"(rank {rank}) {text}")


def partial_path(target: Path) -> Path:
    """Hidden sibling of ``target``: same filesystem, so the final rename is atomic."""
    return target.parent / f".{target.name}.partial"


def discard_partial(target: str | Path) -> None:
    """Remove ``target``'s partial directory (rank 0): an interrupt leaves nothing behind."""
    if _rank() == 0:
        shutil.rmtree(partial_path(Path(target).absolute()), ignore_errors=True)


def _commit(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; an interrupt between the two renames puts the old
    ``target`` back rather than leaving neither."""
    if not target.exists():
        tmp.rename(target)
        return
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds; on any
    exception, ``KeyboardInterrupt`` included, the temporary directory is removed."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise ConversionError(f"{target}: output exists (pass --overwrite to replace it)")
    tmp = partial_path(target)
    if _rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            _commit(tmp, target)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
