"""A megatron-core MoE GPT built from the local (non-TE) spec, and one LM forward/backward pass.

Used by the demo, the benchmarks and the tests; on GPU the same functions work with any
``TransformerConfig``. ``build_model_chunks`` returns this rank's pipeline (and virtual
pipeline) chunks; ``lm_forward_backward`` runs megatron's own schedule over them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch import apply_compat_fixes, with_replay_router
from megatron_pr2.patch.spec import with_planned_dispatch


@dataclass
class TinyMoEShape:
    """A small MoE GPT that runs in seconds on CPU."""

    num_layers: int = 4
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    num_attention_heads: int = 4
    num_moe_experts: int = 8
    moe_router_topk: int = 2
    vocab_size: int = 128
    max_sequence_length: int = 64


def moe_transformer_config(
    shape: TinyMoEShape | None = None, **overrides: Any
) -> TransformerConfig:
    """``TransformerConfig`` for ``shape`` with CPU-safe defaults (no TE, no fused kernels)."""
    shape = shape or TinyMoEShape()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    kwargs: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        moe_ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_moe_experts=shape.num_moe_experts,
        moe_router_topk=shape.moe_router_topk,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,  # same weights in every TP/EP layout
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()
        ),
        sequence_parallel=tp > 1,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        apply_rope_fusion=False,
        # On gloo (CPU), batched isend/irecv between the same two ranks (PP2: the next and the
        # previous stage are one peer) can pair forward and backward messages wrongly: the
        # interleaved schedule then trains on swapped activations. Observed as wrong losses for
        # later microbatches under PP2 x VP2; separate sends/receives are exact.
        batch_p2p_comm=torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model_chunks(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    replay_config: RouterReplayConfig | None = None,
    planned_dispatch: bool = False,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage).

    With ``replay_config`` given and ``installs_router``, every MoE router is a
    ``ReplayTopKRouter``; otherwise the model is plain megatron-core. ``planned_dispatch``: MoE
    layers whose all-to-all dispatcher can take its sizes from a replay plan
    (``replay.dispatch_plan``).
    """
    apply_compat_fixes()
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=stage)
        if replay_config is not None and replay_config.installs_router:
            spec = with_replay_router(spec, replay_config)
        if planned_dispatch:
            spec = with_planned_dispatch(spec)
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                position_embedding_type="rope",
                vp_stage=stage,
            )
        )
    if torch.cuda.is_available():  # as megatron's get_model: CPU-initialised, then moved
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (inputs built on the host are moved there)."""
    return next(model.parameters()).device


@dataclass
class LMBatch:
    """One microbatch: ``tokens``/``labels``/``loss_mask`` are ``[batch, seq]``."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    @classmethod
    def random(cls, batch: int, seq: int, vocab: int, generator: torch.Generator) -> LMBatch:
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        return cls(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.ones(batch, seq))


def lm_forward_step(batches: Iterator[LMBatch], model: GPTModel) -> tuple[torch.Tensor, Callable]:
    batch = next(batches)
    device = model_device(model)
    tokens, labels = batch.tokens.to(device), batch.labels.to(device)
    seq = tokens.shape[1]
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, attention_mask=None, labels=labels)

    def loss_func(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.loss_mask.to(per_token_loss.device, per_token_loss.dtype)
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
        # clone: megatron divides the returned loss in place by the micro-batch count, and a
        # detached alias would report that share instead of this micro-batch's mean loss
        return loss, {"lm_loss": loss.detach().clone()}

    return output, loss_func


def lm_forward_backward(
    chunks: Sequence[GPTModel],
    batches: Sequence[LMBatch],
    forward_only: bool = False,
    forward_step_func: Callable = lm_forward_step,
) -> list[dict[str, torch.Tensor]]:
    """One pass of megatron's schedule (no pipelining, 1F1B or interleaved, picked by megatron)
    over ``batches`` (one per microbatch). Returns the per-microbatch loss dicts (last stage)."""
    num_microbatches = len(batches)
    batch_size, seq = batches[0].tokens.shape
    iterators: Any = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterators,
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )
