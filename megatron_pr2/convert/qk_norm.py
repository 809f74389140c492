"""OLMoE's q/k RMSNorm: over the whole projection (all heads), not per head.

megatron-core's ``qk_layernorm`` normalises each head on its own (Qwen3); OLMoE normalises the
full ``q_proj`` / ``k_proj`` output. These modules slot into ``SelfAttentionSubmodules``
(``q_layernorm``/``k_layernorm``) and see megatron's ``[s, b, heads_local, head_dim]`` query or
key; under TP the sum of squares is all-reduced over the TP group (with an all-reduce in the
backward too, since every rank's output depends on it) and the weight is TP-sharded like the
heads.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class _FullProjectionRMSNorm(MegatronModule):
    #: TransformerConfig attribute holding the number of heads this norm spans.
    heads_attr = "num_attention_heads"

    def __init__(self, hidden_size: int, config, eps: float = 1e-5) -> None:
        super().__init__(config=config)
        heads = getattr(config, self.heads_attr)
        if self.heads_attr == "num_query_groups" and heads is None:
            heads = config.num_attention_heads
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = hidden_size
        self.full_dim = heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(heads // tp * hidden_size, dtype=config.params_dtype)
        )
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(*shape[:-2], -1).float()
        sum_sq = flat.pow(2).sum(-1, keepdim=True)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            sum_sq = all_reduce(sum_sq, group=parallel_state.get_tensor_model_parallel_group())
        normed = flat * torch.rsqrt(sum_sq / self.full_dim + self.eps)
        return (self.weight * normed.to(x.dtype)).view(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class FullQueryRMSNorm(_FullProjectionRMSNorm):
    """RMSNorm over all query heads (OLMoE ``q_norm``, weight ``[num_heads * head_dim]``)."""

    heads_attr = "num_attention_heads"


class FullKeyRMSNorm(_FullProjectionRMSNorm):
    """RMSNorm over all key heads (OLMoE ``k_norm``, weight ``[num_kv_heads * head_dim]``)."""

    heads_attr = "num_query_groups"
