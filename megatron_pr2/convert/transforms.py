"""Tensor transforms between HF and megatron-core layouts (pure torch, both directions).

* QKV: megatron's ``linear_qkv`` interleaves per query group: for each of the ``ng`` KV
  groups, that group's ``np/ng`` query heads, then its key head, then its value head. Chunking
  the fused tensor along dim 0 over TP then gives each rank whole groups.
* gate/up: a SwiGLU ``linear_fc1`` is ``cat(gate, up)``; under TP/ETP each rank holds
  ``cat(gate_shard, up_shard)``, which is not a plain chunk of the full tensor.
"""

from __future__ import annotations

import torch


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int, head_dim: int
) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` weights -> megatron ``linear_qkv`` weight."""
    hidden = q.shape[-1]
    q = q.reshape(num_query_groups, -1, head_dim, hidden)  # [ng, np/ng, hd, H]
    k = k.reshape(num_query_groups, 1, head_dim, hidden)
    v = v.reshape(num_query_groups, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(
    qkv: torch.Tensor, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(num_query_groups, -1, head_dim, hidden)
    per_group = grouped.shape[1] - 2
    q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
    return (
        q.reshape(-1, hidden).contiguous(),
        k.reshape(-1, hidden).contiguous(),
        v.reshape(-1, hidden).contiguous(),
    )


def shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``tensor`` along ``dim`` (sizes already checked)."""
    if size == 1:
        return tensor
    return torch.chunk(tensor, size, dim=dim)[rank]


def gate_up_shard(gate: torch.Tensor, up: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's SwiGLU ``linear_fc1`` weight: ``cat(gate_shard, up_shard)``."""
    return torch.cat([shard(gate, 0, rank, size), shard(up, 0, rank, size)], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (unsharded) ``linear_fc1`` -> (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
