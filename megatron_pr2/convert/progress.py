"""A progress bar that degrades to nothing when tqdm is missing or output is not wanted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None, desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar when tqdm is importable and ``enabled``."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
        else:
            yield from tqdm(items, total=total, desc=desc, unit="tensor", leave=False)
            return
    yield from items
