"""Routes keyed by token, so they follow the token across different micro-batchings.

A framework's log-prob pass and its update passes may micro-batch, order and pack the same
samples differently (NeMo-RL does), so "microbatch ``i``, row ``j``" names another token in each
pass. :class:`TokenRoutes` keys every recorded route row by its token key (``sample << 32 |
position``, see ``predictor.cache.token_keys`` and ``routes.layout.rank_token_keys``) and
rebuilds the positional ``{layer: [route per microbatch]}`` for any new micro-batching::

    with session.recording(keys_of_log_prob_microbatches) as record:
        forward_backward_func(..., forward_only=True)
    by_token = record.by_token()
    with session.replaying(by_token.plan(keys_of_update_microbatches), keys_of_update_microbatches):
        forward_backward_func(...)

Plans are built on the host side once per pass (one ``searchsorted`` per microbatch, then one
gather per layer); the replay hot path is unchanged. Negative keys are padding: they are never
recorded, and in a plan they become all ``-1`` rows (live routing) only when the caller says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: ``{layer: [route rows per microbatch]}`` (``None`` = live for that whole microbatch).
MicrobatchRoutes = Mapping[int, Sequence["torch.Tensor | None"]]


class TokenRoutes:
    """Per layer, route rows sorted by token key (every layer holds the same tokens)."""

    def __init__(self, keys: torch.Tensor, rows: dict[int, torch.Tensor]) -> None:
        """``keys``: ``[N]`` int64 host keys, sorted ascending and unique; ``rows``: per layer
        ``[N, topk]`` routes in the same order (use :meth:`from_microbatches` to build)."""
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError(f"keys must be 1-D int64, got {keys.dtype} {tuple(keys.shape)}")
        for layer, r in rows.items():
            if r.dim() != 2 or r.shape[0] != keys.shape[0]:
                raise ValueError(
                    f"layer {layer}: expected [{keys.shape[0]}, topk] rows, got {tuple(r.shape)}"
                )
        self.keys, self.rows = keys, rows

    @classmethod
    def from_microbatches(
        cls, routes: MicrobatchRoutes, token_keys: Sequence[torch.Tensor]
    ) -> TokenRoutes:
        """From a pass's positional routes and the ``[tokens]`` int64 keys of each of its
        microbatches, in the router's row order. Padding rows (negative keys) are dropped; a key
        seen twice is refused (two tokens cannot share one identity)."""
        keys = [k.detach().cpu().to(torch.int64).reshape(-1) for k in token_keys]
        flat = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64)
        real = flat >= 0
        order = flat[real].argsort(stable=True)
        sorted_keys = flat[real][order]
        if sorted_keys.numel() > 1:
            repeated = (sorted_keys[1:] == sorted_keys[:-1]).nonzero()
            if repeated.numel():
                key = int(sorted_keys[int(repeated[0])])
                raise ValueError(f"token key {_describe(key)} appears twice in the recorded pass")
        rows: dict[int, torch.Tensor] = {}
        for layer, per_mb in routes.items():
            if len(per_mb) != len(keys):
                raise ValueError(
                    f"routes for layer {layer}: {len(per_mb)} microbatch(es), but token keys "
                    f"for {len(keys)}"
                )
            parts = []
            for mb, (r, k) in enumerate(zip(per_mb, keys)):
                if r is not None and r.shape[0] != k.shape[0]:
                    raise ValueError(
                        f"routes for layer {layer}, microbatch {mb}: {r.shape[0]} rows, but "
                        f"{k.shape[0]} token keys"
                    )
                parts.append(r)
            rows[layer] = _concat_rows(parts, keys)[real.to(_device_of(parts))][
                order.to(_device_of(parts))
            ]
        return cls(sorted_keys, rows)

    @property
    def layers(self) -> list[int]:
        return sorted(self.rows)

    def __len__(self) -> int:
        """Tokens held (per layer)."""
        return int(self.keys.shape[0])

    def plan(
        self, token_keys: Sequence[torch.Tensor], padding_live: bool = False
    ) -> dict[int, list[torch.Tensor]]:
        """Positional routes ``{layer: [route per microbatch]}`` for microbatches holding the
        tokens ``token_keys`` (per microbatch ``[tokens]`` int64, router row order).

        A key never recorded is refused, naming layer, microbatch and the first such key.
        ``padding_live``: negative keys (padding) get all ``-1`` rows, which route live;
        without it they are refused like any unknown key.
        """
        index_per_mb = [self._lookup(k, mb, padding_live) for mb, k in enumerate(token_keys)]
        out: dict[int, list[torch.Tensor]] = {}
        for layer, rows in self.rows.items():
            # One trailing all -1 row: padding indexes it, so one gather builds the microbatch.
            table = torch.cat([rows, rows.new_full((1, rows.shape[1]), -1)])
            out[layer] = [table[index.to(rows.device)] for index in index_per_mb]
        return out

    def _lookup(self, keys: torch.Tensor, mb: int, padding_live: bool) -> torch.Tensor:
        """Row of each key in ``self.keys``; ``len(self)`` (the -1 row) for padding."""
        keys = keys.detach().cpu().to(torch.int64).reshape(-1)
        n = len(self)
        at = torch.searchsorted(self.keys, keys).clamp(max=max(n - 1, 0))
        found = (self.keys[at] == keys) if n else torch.zeros_like(keys, dtype=torch.bool)
        padding = keys < 0
        missing = ~found & ~padding if padding_live else ~found
        if missing.any():
            first = int(keys[int(missing.nonzero()[0])])
            layer = self.layers[0] if self.rows else None
            what = (
                "padding (pass padding_live=True to route it live)"
                if first < 0
                else ("never recorded")
            )
            raise ValueError(
                f"routes for layer {layer} (and every layer), microbatch {mb}: token key "
                f"{_describe(first)} {what}"
            )
        return torch.where(padding, n, at) if padding_live else at


def _describe(key: int) -> str:
    return (
        f"{key} (padding)"
        if key < 0
        else f"{key} (sample {key >> 32}, position {key & 0xFFFFFFFF})"
    )


def _device_of(parts: Sequence[torch.Tensor | None]) -> torch.device:
    return next((p.device for p in parts if p is not None), torch.device("cpu"))


def _concat_rows(
    parts: Sequence[torch.Tensor | None], keys: Sequence[torch.Tensor]
) -> torch.Tensor:
    """One layer's rows of every microbatch; a live (``None``) microbatch records ``-1`` rows,
    so its tokens keep routing live wherever they land."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("a layer with no routes in any microbatch has nothing to key")
    like = present[0]
    return torch.cat(
        [
            p if p is not None else like.new_full((k.shape[0], like.shape[1]), -1)
            for p, k in zip(parts, keys)
        ]
    )
