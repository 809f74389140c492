"""A zero-initialised linear map from the router input to a per-expert logit offset."""

from __future__ import annotations

import torch

#: Attribute that marks predictor parameters (optimizer grouping, export filtering).
PREDICTOR_ATTR = "is_evolution_predictor"


class EvolutionPredictor(torch.nn.Module):
    """``offset = hidden @ weight.T``, no bias, ``weight`` zero at start so PR2 starts as R2.

    The weight is fp32 (like the router weight it sits next to). Under sequence parallelism
    each TP rank sees different tokens, so the weight is tagged ``sequence_parallel`` exactly
    like megatron tags the router weight, and ``finalize_model_grads`` all-reduces its
    gradient over TP. It is replicated across EP and lives on its layer's pipeline stage.
    """

    def __init__(self, hidden_size: int, num_experts: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.weight.sequence_parallel = sequence_parallel
        setattr(self.weight, PREDICTOR_ATTR, True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != self.weight.dtype:
            hidden = hidden.to(self.weight.dtype)
        return torch.nn.functional.linear(hidden, self.weight)


def predictor_parameters(
    model: torch.nn.Module | list[torch.nn.Module],
) -> list[torch.nn.Parameter]:
    chunks = model if isinstance(model, list) else [model]
    return [p for chunk in chunks for p in chunk.parameters() if getattr(p, PREDICTOR_ATTR, False)]
