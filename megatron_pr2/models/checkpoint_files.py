"""Name the damaged file of a megatron ``torch_dist`` checkpoint that fails to load.

A truncated or zeroed ``.distcp`` file surfaces from ``dist_checkpointing.load`` as a bare
``EOFError`` or torch.load's help text, with no file in it. After a load failed, every reader
of such a checkpoint (``pr2 convert mcore-to-hf``, the trainer's load/resume) asks
:func:`find_damaged_file` which file is at fault, and reports that in one line. The check reads
the files the way torch's ``FileSystemReader`` does: ``.metadata`` lists, per item, its file,
byte range and whether it is a tensor (written with ``torch.save``) or raw bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.errors import UserError

__all__ = ["CheckpointFileError", "find_damaged_file", "loading_error"]


class CheckpointFileError(UserError):
    """A file of a dist checkpoint is missing, truncated or corrupt; the message names it."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _read_metadata(directory: Path) -> tuple[Any, str | None]:
    """torch's checkpoint metadata, or the one-line reason it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    path = directory / ".metadata"
    if not path.is_file():
        return None, f"{path}: missing (every torch_dist checkpoint has one)"
    try:
        return FileSystemReader(str(directory)).read_metadata(), None
    except Exception as exc:  # pickle raises several types for a damaged file
        return None, f"{path}: unreadable checkpoint metadata ({_first_line(exc)})"


def _items_by_file(metadata: Any) -> dict[str, list[tuple[str, Any]]]:
    """``relative_path -> [(fqn, storage info)]`` from the metadata's storage table."""
    by_file: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for index, info in metadata.storage_data.items():
        by_file[info.relative_path].append((index.fqn, info))
    return by_file


def _check_data_file(path: Path, items: list[tuple[str, Any]], metadata: Any) -> str | None:
    """Size, then every tensor item's ``torch.load``, as the reader would do them."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not path.is_file():
        return f"{path}: missing (the checkpoint's .metadata lists it)"
    size = path.stat().st_size
    needed = max(info.offset + info.length for _, info in items)
    if size < needed:
        return f"{path}: truncated dist checkpoint file ({size} bytes, its items need {needed})"
    with path.open("rb") as stream:
        for fqn, info in sorted(items, key=lambda item: item[1].offset):
            is_tensor = isinstance(metadata.state_dict_metadata.get(fqn), TensorStorageMetadata)
            if not is_tensor or info.transform_descriptors:  # raw bytes, or compressed
                continue
            stream.seek(info.offset)
            raw = stream.read(info.length)
            try:
                torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as exc:  # torch.load's text is a help page: keep its type only
                why = "all bytes are zero" if raw.count(0) == len(raw) else type(exc).__name__
                return (
                    f"{path}: corrupt dist checkpoint file: tensor {fqn!r} at bytes "
                    f"{info.offset}-{info.offset + info.length} does not load ({why})"
                )
    return None


def _check_side_files(directory: Path) -> str | None:
    """megatron's own files beside torch's: ``metadata.json`` and ``common.pt``."""
    config = directory / "metadata.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{config}: not valid JSON ({_first_line(exc)})"
    common = directory / "common.pt"
    if common.is_file():
        try:  # torch.save archives are zip files; checking CRCs runs none of their pickles
            with zipfile.ZipFile(common) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"{common}: truncated or corrupt torch.save file ({_first_line(exc)})"
        if bad is not None:
            return f"{common}: corrupt torch.save file (member {bad!r} fails its checksum)"
    return None


def find_damaged_file(directory: str | Path) -> str | None:
    """One line naming the first missing, truncated or corrupt file of the checkpoint at
    ``directory``, or ``None`` when every file reads (the failure is something else).

    Reads every tensor once: call it after a load failed, not before every load.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: no such checkpoint directory"
    problem = _check_side_files(directory)
    if problem:
        return problem
    metadata, problem = _read_metadata(directory)
    if problem:
        return problem
    for relative_path, items in sorted(_items_by_file(metadata).items()):
        problem = _check_data_file(directory / relative_path, items, metadata)
        if problem:
            return problem
    return None


def loading_error(directory: str | Path, exc: BaseException) -> CheckpointFileError | None:
    """The error to raise instead of ``exc`` when a damaged file explains it (else ``None``:
    re-raise ``exc``)."""
    problem = find_damaged_file(directory)
    return None if problem is None else CheckpointFileError(problem)
