"""The RL loop's view of megatron's process groups: setup from the config, and the few
collectives the loop needs outside megatron's schedule (broadcasts and metric reductions).

Layout of one rollout batch over ranks: every rank holds the whole batch (the rollout engine
runs on every rank in the trainer's layout); each data-parallel rank trains on its contiguous
share of every mini-batch; log-probs are computed on the last pipeline stage and broadcast, so
``get_logprobs`` returns the whole batch's log-probs on every rank (NeMo-RL's contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_pr2.replay.session import RouteTrace

__all__ = [
    "ParallelSizes",
    "broadcast_from_last_stage",
    "combine_last_stage_metrics",
    "data_parallel_rank_size",
    "ensure_model_parallel",
    "is_logging_rank",
]


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: int | None = None
    virtual_pipeline: int | None = None


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the host."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ensure_model_parallel(sizes: ParallelSizes) -> None:
    """Initialise megatron's model-parallel state for ``sizes`` (or check the existing one)."""
    world = _world()
    model = sizes.tensor * sizes.pipeline
    if world % model:
        raise ValueError(
            f"world size {world} is not divisible by tensor x pipeline parallel = {model} "
            "(policy.tensor_model_parallel_size x policy.pipeline_model_parallel_size)"
        )
    if parallel_state.model_parallel_is_initialized():
        have = ParallelSizes(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
            None,
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
        want = ParallelSizes(
            sizes.tensor, sizes.pipeline, sizes.expert, None, sizes.virtual_pipeline
        )
        if have != want:
            raise ValueError(f"megatron is initialised as {have}, the config asks for {want}")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
        expert_model_parallel_size=sizes.expert,
        expert_tensor_parallel_size=sizes.expert_tensor,
    )


def data_parallel_rank_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def is_logging_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _last_stage_source() -> int:
    """Global rank of the last pipeline stage in this rank's pipeline group."""
    return parallel_state.get_pipeline_model_parallel_last_rank()


def broadcast_from_last_stage(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (set on the last pipeline stage) on every stage of this pipeline; other
    stages pass ``None`` and get a tensor shaped and typed like ``like``."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert tensor is not None
        return tensor
    out = tensor.to(like.device) if tensor is not None else torch.empty_like(like)
    dist.broadcast(
        out, src=_last_stage_source(), group=parallel_state.get_pipeline_model_parallel_group()
    )
    return out


def all_gather_data_parallel(local: torch.Tensor) -> torch.Tensor:
    """Concatenate each data-parallel rank's ``local`` rows in DP-rank order."""
    group = parallel_state.get_data_parallel_group()
    if group.size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def broadcast_from_data_parallel_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Data-parallel rank 0's ``tensor`` on every DP rank (replicas agree bit for bit)."""
    group = parallel_state.get_data_parallel_group()
    if group.size() > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


def combine_last_stage_metrics(
    local: dict[str, float] | None, reductions: dict[str, str]
) -> dict[str, float]:
    """Reduce per-rank loss metrics over data parallelism; the same dict on every rank.

    ``local``: this rank's metrics when it is a last pipeline stage (TP rank 0 speaks for its
    tensor-parallel group), else None. ``reductions``: name -> sum | mean | min | max.
    """
    if _world() == 1:
        return dict(local or {})
    speaks = local is not None and parallel_state.get_tensor_model_parallel_rank() == 0
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, local if speaks else None)
    parts: Sequence[dict[str, float]] = [g for g in gathered if g is not None]
    out: dict[str, float] = {}
    for name in parts[0] if parts else ():
        values = [p[name] for p in parts if name in p]
        how = reductions.get(name, "mean")
        if how == "sum":
            out[name] = float(sum(values))
        elif how == "min":
            out[name] = float(min(values))
        elif how == "max":
            out[name] = float(max(values))
        else:
            out[name] = float(sum(values) / len(values))
    return out


def gather_route_traces(local: dict[int, RouteTrace]) -> dict[int, RouteTrace]:
    """Every rank's route traces merged by layer (pipeline stages hold other layers, DP and SP
    ranks other tokens); the same dict on every rank. Diagnostics only: pickles through gloo."""
    if _world() == 1:
        return dict(local)
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, local)
    merged: dict[int, list[RouteTrace]] = {}
    for part in gathered:
        for layer, trace in part.items():
            merged.setdefault(layer, []).append(trace)
    return {
        layer: RouteTrace(
            torch.cat([t.keys for t in parts]),
            torch.cat([t.used for t in parts]),
            torch.cat([t.live for t in parts]),
        )
        for layer, parts in sorted(merged.items())
    }


def gather_floats(local: dict[int, float]) -> dict[int, float]:
    """Merge ``{layer: value}`` dicts of all ranks (the first rank's value wins on overlap)."""
    if _world() == 1:
        return dict(local)
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, local)
    out: dict[int, float] = {}
    for part in gathered:
        for key, value in part.items():
            out.setdefault(key, value)
    return dict(sorted(out.items()))
