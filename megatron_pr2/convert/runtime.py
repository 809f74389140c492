"""megatron parallel state for a conversion (the process group itself is the caller's)."""

from __future__ import annotations

import torch

from megatron_pr2.convert.layout import ConvertLayout


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def init_parallel_state(layout: ConvertLayout, seed: int = 1234) -> None:
    """(Re)initialise megatron's model-parallel groups for ``layout`` on the current world."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
