"""One microbatch's token keys, held once per pass and shared by every router of the rank.

Token keys (``sample << 32 | position``, negative for padding; see ``routes.layout``) are the
same for every MoE layer of a microbatch, and so is everything derived from them alone: the
padding mask, which tokens the PR2 feature cache samples, where those tokens sit in the cache.
Deriving them once per microbatch instead of once per router call saves ops on every layer, and
deriving them from the host copy of the keys saves the device-to-host syncs a per-call
``nonzero`` or ``.cpu()`` would cost on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


class MicrobatchKeys:
    """``[tokens]`` int64 keys of one microbatch on the host and on the routers' device."""

    def __init__(self, keys: torch.Tensor, device: torch.device | str | None = None) -> None:
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError(
                f"token keys must be a 1-D int64 tensor, got {keys.dtype} {tuple(keys.shape)}"
            )
        self.host = keys.detach().cpu()  # a no-op for host keys (the trainer's case)
        target = keys.device if device is None else torch.device(device)
        self.on_device = self.host if target.type == "cpu" else keys.to(target, non_blocking=True)
        self._derived: dict[Hashable, Any] = {}
        self._len = self.host.shape[0]
        self._has_padding = bool((self.host < 0).any())  # host op: no device sync

    @classmethod
    def positional(cls, microbatch: int, num_tokens: int, device: torch.device | str):
        """Keys ``(microbatch, row)`` for passes given no keys (same micro-batching needed)."""
        return cls((microbatch << 32) + torch.arange(num_tokens, dtype=torch.int64), device)

    def __len__(self) -> int:
        return self._len

    def padding_rows(self) -> torch.Tensor | None:
        """``[tokens]`` bool on the device, True for padding; None when there is none."""
        if not self._has_padding:
            return None
        return self.derived("padding_rows", lambda: self.on_device < 0)

    def derived(self, name: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per microbatch and pass: for values that depend on the keys alone,
        so the first router computes them and the others reuse them."""
        try:
            return self._derived[name]
        except KeyError:
            value = self._derived[name] = compute()
            return value
