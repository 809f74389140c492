"""Streaming safetensors input and output.

The reader parses every file's header itself first (8-byte length + JSON), so a truncated or
corrupt file is reported with the first tensor whose bytes are missing, before any work is
done; tensors are then read one at a time (or a slice of one) through ``safe_open``. The writer
holds at most one output shard (``max_shard_bytes``) in memory and writes the HF index file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.convert.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
#: Side file of PR2 predictor weights next to an HF model (not part of the HF model).
PREDICTOR_FILE = "pr2_predictor.safetensors"
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path.name}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ConversionError(
                f"{path.name}: truncated safetensors file (header of {header_len} bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path.name}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        expected = numel * _DTYPE_BYTES.get(entry["dtype"], 0)
        if end > data_bytes:
            raise ConversionError(
                f"{path.name}: truncated safetensors file: tensor {name!r} needs bytes up to "
                f"{end}, the file's data section has {data_bytes}"
            )
        if _DTYPE_BYTES.get(entry["dtype"]) and end - start != expected:
            raise ConversionError(
                f"{path.name}: corrupt safetensors entry for tensor {name!r} "
                f"({end - start} bytes for shape {entry['shape']} {entry['dtype']})"
            )
    return header


class SafetensorsReader:
    """Lazy, validated access to the tensors of an HF folder (one file or an index), or of
    the single file ``only``."""

    UNMAP_EVERY_BYTES = 64 * 1024**2

    def __init__(self, folder: str | Path, only: str | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if only is not None:
            files, weight_map = [only], {}
        elif index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(
                p.name for p in self.folder.glob("*.safetensors") if p.name != PREDICTOR_FILE
            )
            weight_map = {}
        if not files:
            raise ConversionError(f"{self.folder}: no *.safetensors files")
        self._file_of: dict[str, Path] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ConversionError(f"{INDEX_NAME}: lists {name}, which does not exist")
            for tensor, entry in read_header(path).items():
                self._file_of[tensor] = path
                self._entries[tensor] = entry
        for tensor, name in weight_map.items():
            if tensor not in self._file_of:
                raise ConversionError(
                    f"{INDEX_NAME}: tensor {tensor!r} is mapped to {name} but is not in it"
                )
        self._handles: dict[Path, Any] = {}
        self._mapped_bytes = 0
        self.read_names: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._entries[name]["shape"])

    def total_bytes(self) -> int:
        """Bytes of tensor data in the folder (for throughput figures)."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._entries.values())

    def _require(self, name: str) -> None:
        if name not in self._entries:
            raise ConversionError(f"{self.folder}: missing tensor {name!r}")

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, index: Any = None
    ) -> torch.Tensor:
        """Tensor ``name`` (or ``tensor[index]`` read without the rest), its full shape
        checked against ``shape``."""
        self._require(name)
        if shape is not None and self.shape(name) != tuple(shape):
            raise ConversionError(
                f"tensor {name!r}: shape {list(self.shape(name))} does not match the config's "
                f"{list(shape)}"
            )
        self.read_names.add(name)
        handle = self._handle(name)
        tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        # safe_open maps the file: the pages read stay resident (counted in RSS) while it is
        # open. Tensors come back as copies, so unmap every so often to keep memory flat.
        start, end = self._entries[name]["data_offsets"]
        self._mapped_bytes += end - start
        if self._mapped_bytes >= self.UNMAP_EVERY_BYTES:
            self.close()
        return tensor

    def close(self) -> None:
        """Drop the open file handles (and their memory maps)."""
        self._handles.clear()
        self._mapped_bytes = 0


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of bounded size."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor``; writes the pending shard first if it would grow too big."""
        if name in self._pending or any(name in s for s in self._shards):
            raise ConversionError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        index = len(self._shards)
        save_file(self._pending, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names and write the index (if several)."""
        self._flush()
        count = len(self._shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for i, (name, tensors) in enumerate(zip(names, self._shards)):
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
            weight_map.update({t: name for t in tensors})
        if count > 1:
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an HF folder, one at a time (for tests and round-trip checks)."""
    reader = SafetensorsReader(folder)
    for name in reader.names():
        yield name, reader.get(name)
