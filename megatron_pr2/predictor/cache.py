"""Budgeted host-memory cache of (router input, old logits) for sampled tokens of one layer.

Tokens are keyed by ``sample_id << 32 | position`` so the update passes find the same tokens
whatever the micro-batching. Which tokens are kept is a pure function of the key (a hash below a
threshold), so every pass and every rank agrees without communication.
"""

from __future__ import annotations

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HASH_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (Fibonacci hashing)


def token_keys(sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return (sample_ids.to(torch.int64) << 32) | positions.to(torch.int64)


def sampled(keys: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Bool mask: the tokens whose key hashes below ``keep_fraction``; deterministic."""
    if keep_fraction >= 1.0:
        return torch.ones_like(keys, dtype=torch.bool)
    hashed = ((keys * _HASH_MULT) >> 40) & ((1 << 24) - 1)  # top bits, uniform in [0, 2^24)
    return hashed < int(keep_fraction * (1 << 24))


class FeatureCache:
    """Rows of (input, old logits) by token key; append during recording, then lookup.

    Each row is the router input and the old logits side by side in one tensor, so a router
    call moves its sampled tokens to the host with one copy and a loss call moves them back with
    one (on a GPU each device-to-host copy of pageable memory waits for the device)."""

    def __init__(self, dtype: str = "bf16") -> None:
        self.dtype = _DTYPES[dtype]
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, rows)
        self._keys: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # [tokens, hidden + experts], sorted by key
        self._hidden_size = 0
        self._num_tokens = 0  # kept as ints: summing tensor sizes per call costs torch ops
        self._nbytes = 0

    @torch.no_grad()
    def add(self, keys: torch.Tensor, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """Append rows (copied to host memory in the cache dtype; no autograd history kept)."""
        if keys.shape[0] == 0:
            return
        self._hidden_size = inputs.shape[-1]
        rows = torch.cat([inputs, logits], dim=1).to("cpu", self.dtype)  # one copy to the host
        self._parts.append((keys.cpu(), rows))
        num_rows, width = rows.shape
        self._num_tokens += num_rows
        self._nbytes += num_rows * (8 + width * self.dtype.itemsize)  # int64 key + the row
        self._keys = None  # re-sort lazily

    def _finalize(self) -> None:
        if self._keys is not None or not self._parts:
            return
        keys = torch.cat([k for k, _ in self._parts])
        order = keys.argsort()
        self._keys = keys[order]
        self._rows = torch.cat([r for _, r in self._parts])[order]
        self._parts = [(self._keys, self._rows)]

    @property
    def sorted_keys(self) -> torch.Tensor | None:
        """The cached keys, ascending (host); None while the cache is empty."""
        self._finalize()
        return self._keys

    def share_keys_with(self, other: FeatureCache) -> None:
        """Adopt ``other``'s sorted-key tensor when both caches hold the same keys (every layer
        of a rank caches the same tokens), so a lookup computed for one serves both."""
        mine, theirs = self.sorted_keys, other.sorted_keys
        if mine is not None and theirs is not None and torch.equal(mine, theirs):
            self._keys = theirs
            self._parts = [(theirs, self._rows)]

    def locate(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the host ``keys`` that are cached, their positions in this cache)."""
        cached = self.sorted_keys
        if cached is None:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty
        position = torch.searchsorted(cached, keys).clamp_(max=cached.numel() - 1)
        rows = (cached[position] == keys).nonzero().flatten()
        return rows, position[rows]

    def features(
        self, positions: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (inputs, old logits) at ``positions`` (from :meth:`locate`), fp32 on device."""
        if self._rows is None:
            return torch.empty(0, device=device), torch.empty(0, device=device)
        rows = self._rows[positions].to(device, torch.float32)  # one copy to the device
        return rows[:, : self._hidden_size], rows[:, self._hidden_size :]

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def clear(self) -> None:
        self.__init__({v: k for k, v in _DTYPES.items()}[self.dtype])
