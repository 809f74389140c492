"""The rollout side of the GRPO loop as a small interface, so the engine can be swapped.

Why an interface: the trainer only needs "prompts in -> tokens, μ log-probs, routes out" and
"take the trainer's new weights". In-process megatron generation (:mod:`megatron_pr2.rl.
kv_engine`) serves tests and single-node runs; GPU clusters run vLLM
(:mod:`megatron_pr2.rl.vllm_backend`). Both return the same :class:`~megatron_pr2.rl.engine.
Rollout`, so the worker's replay does not know which engine sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from megatron_pr2.rl.config import GenerationConfig
from megatron_pr2.rl.engine import Rollout

__all__ = ["GenerationBackend", "build_generation_backend"]


@runtime_checkable
class GenerationBackend(Protocol):
    """What the trainer calls on a rollout engine."""

    applies_predictor: bool  # pr2_r3: sampling (and recorded routes) under the PR2 predictor

    def refresh(self, trainer_modules: Sequence[torch.nn.Module], include_predictor: bool) -> int:
        """Refit: load the trainer's current weights; returns the number of tensors sent."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        micro_batch_size: int | None = None,
        return_routes: bool = True,
        top_k: int | None = None,
    ) -> Rollout:
        """Sample up to ``max_new_tokens`` per prompt; routes in the trainer's replay layout
        (for ``micro_batch_size``) when ``return_routes``."""
        ...


def build_generation_backend(
    generation: GenerationConfig,
    config: Any,
    vocab_size: int,
    max_sequence_length: int,
    **engine_kwargs: Any,
) -> GenerationBackend:
    """The backend ``generation.backend`` names, with ``generation.top_k`` as its default.

    ``config``, ``vocab_size``, ``max_sequence_length`` and ``engine_kwargs`` are those of
    :class:`~megatron_pr2.rl.engine.RolloutEngine` (for ``megatron``). ``vllm`` needs a running
    vLLM engine and a weight sync, which the in-process trainer does not build: construct
    :class:`~megatron_pr2.rl.vllm_backend.VLLMBackend` directly where a cluster provides them.
    """
    if generation.backend == "megatron":
        from megatron_pr2.rl.kv_engine import KVCacheEngine

        return KVCacheEngine(
            config, vocab_size, max_sequence_length, top_k=generation.top_k, **engine_kwargs
        )
    if generation.backend == "vllm":
        raise ValueError(
            "generation.backend=vllm: the in-process trainer has no vLLM engine to drive; build "
            "megatron_pr2.rl.vllm_backend.VLLMBackend(llm, weight_sync, ...) on a GPU cluster, "
            "or use generation.backend=megatron"
        )
    raise ValueError(f"unknown generation backend {generation.backend!r}")
