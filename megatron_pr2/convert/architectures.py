"""The architecture table: per HF ``model_type``, how its config maps to megatron-core
``TransformerConfig`` kwargs and how its tensor names map to megatron's.

One table instead of a script per model: Qwen3-MoE, OLMoE and Mixtral differ only in a few
names (Mixtral's legacy ``block_sparse_moe.w1/w2/w3``), the q/k norm (per head for Qwen3,
over the whole projection for OLMoE) and how router probabilities are normalised. Name
templates use ``{layer}`` (global, 0-based) and ``{expert}`` (global) placeholders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_config import (
    HFModelShape,
    HFSettings,
    check_rope_variant,
    read_shape,
)

LAYER = "model.layers.{layer}."

#: megatron GPTModel names that do not depend on the architecture (``{layer}`` is global).
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
M_LAYER = "decoder.layers.{layer}."


@dataclass(frozen=True)
class ExpertNames:
    """HF names of one MoE block: router, per-expert (default save) and fused (5.x in-memory,
    ``save_original_format=False``) layouts. The fused gate_up tensor is ``[E, 2I, H]``
    (gate rows first, then up), down is ``[E, H, I]``."""

    router: str
    gate: str
    up: str
    down: str
    fused_router: str
    fused_gate_up: str
    fused_down: str


@dataclass(frozen=True)
class Architecture:
    """One row of the table."""

    name: str
    model_types: tuple[str, ...]
    hf_class: str
    experts: ExpertNames
    qk_norm: str | None  # None, "head" (per attention head) or "full" (whole projection)
    always_norm_topk: bool = False  # Mixtral renormalises top-k probabilities unconditionally
    check: Callable[[HFSettings], None] | None = None

    def attention_names(self) -> dict[str, str]:
        """HF attention tensor names (``{layer}`` template) for this row."""
        names = {
            "q": LAYER + "self_attn.q_proj.weight",
            "k": LAYER + "self_attn.k_proj.weight",
            "v": LAYER + "self_attn.v_proj.weight",
            "o": LAYER + "self_attn.o_proj.weight",
        }
        if self.qk_norm:
            names["q_norm"] = LAYER + "self_attn.q_norm.weight"
            names["k_norm"] = LAYER + "self_attn.k_norm.weight"
        return names

    def megatron_kwargs(self, shape: HFModelShape) -> dict[str, Any]:
        """``TransformerConfig`` kwargs (JSON-serialisable; ``activation`` is named, not a
        function) that reproduce the HF forward in megatron-core."""
        norm_topk = self.always_norm_topk or shape.norm_topk_prob
        kwargs: dict[str, Any] = dict(
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            ffn_hidden_size=shape.dense_ffn_hidden_size,
            moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            num_attention_heads=shape.num_attention_heads,
            num_query_groups=shape.num_key_value_heads,
            kv_channels=shape.head_dim,
            num_moe_experts=shape.num_experts,
            moe_router_topk=shape.moe_topk,
            # softmax over all experts then top-k without renormalising == megatron's
            # pre-softmax; renormalised top-k of a softmax == softmax over the top-k logits.
            moe_router_pre_softmax=not norm_topk,
            moe_router_score_function="softmax",
            normalization="RMSNorm",
            layernorm_epsilon=shape.rms_norm_eps,
            gated_linear_unit=True,
            activation="silu",
            add_bias_linear=False,
            add_qkv_bias=False,
            qk_layernorm=self.qk_norm is not None,
        )
        if not all(shape.moe_layers):
            kwargs["moe_layer_freq"] = [int(m) for m in shape.moe_layers]
        return kwargs


def _check_common(settings: HFSettings) -> None:
    """Refuse variants the GPT layer spec built here does not compute (file value, else
    transformers' default for the model_type)."""
    act = settings.value("hidden_act")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported (silu only)")
    if settings.value("attention_bias", fallback=False):
        raise ConversionError("config.json: attention_bias=true is not supported")
    use_window = settings.value("use_sliding_window", fallback=None)
    window = settings.value("sliding_window", fallback=None)
    if use_window or (window is not None and use_window is not False):
        raise ConversionError("config.json: sliding_window attention is not supported")


def _check_olmoe(settings: HFSettings) -> None:
    _check_common(settings)
    if settings.value("clip_qkv", fallback=None) is not None:
        raise ConversionError("config.json: clip_qkv is not supported (OLMoE)")


_QWEN_STYLE = ExpertNames(
    router=LAYER + "mlp.gate.weight",
    gate=LAYER + "mlp.experts.{expert}.gate_proj.weight",
    up=LAYER + "mlp.experts.{expert}.up_proj.weight",
    down=LAYER + "mlp.experts.{expert}.down_proj.weight",
    fused_router=LAYER + "mlp.gate.weight",
    fused_gate_up=LAYER + "mlp.experts.gate_up_proj",
    fused_down=LAYER + "mlp.experts.down_proj",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        hf_class="Qwen3MoeForCausalLM",
        experts=_QWEN_STYLE,
        qk_norm="head",
        check=_check_common,
    ),
    Architecture(
        name="olmoe",
        model_types=("olmoe",),
        hf_class="OlmoeForCausalLM",
        experts=_QWEN_STYLE,
        qk_norm="full",
        check=_check_olmoe,
    ),
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        hf_class="MixtralForCausalLM",
        experts=ExpertNames(
            router=LAYER + "block_sparse_moe.gate.weight",
            gate=LAYER + "block_sparse_moe.experts.{expert}.w1.weight",
            up=LAYER + "block_sparse_moe.experts.{expert}.w3.weight",
            down=LAYER + "block_sparse_moe.experts.{expert}.w2.weight",
            fused_router=LAYER + "mlp.gate.weight",
            fused_gate_up=LAYER + "mlp.experts.gate_up_proj",
            fused_down=LAYER + "mlp.experts.down_proj",
        ),
        qk_norm=None,
        always_norm_topk=True,
        check=_check_common,
    ),
)

#: HF names outside the decoder layers, and of dense (non-MoE) MLP layers.
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_INPUT_NORM = LAYER + "input_layernorm.weight"
HF_POST_ATTN_NORM = LAYER + "post_attention_layernorm.weight"
HF_DENSE_MLP = {
    "gate": LAYER + "mlp.gate_proj.weight",
    "up": LAYER + "mlp.up_proj.weight",
    "down": LAYER + "mlp.down_proj.weight",
}


#: HF model types built on multi-head latent attention (any config with ``kv_lora_rank`` is too).
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def _uses_mla(config: dict[str, Any]) -> bool:
    return config.get("model_type") in MLA_MODEL_TYPES or config.get("kv_lora_rank") is not None


def architecture_for(config: dict[str, Any]) -> Architecture:
    """The table row for ``config['model_type']``; a clear error for anything else."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    if _uses_mla(config):
        raise ConversionError(
            f"config.json: model_type={model_type!r} uses multi-head latent attention (MLA), "
            "which is not supported: the converter maps standard attention (q_proj, k_proj, "
            "v_proj) onto the megatron GPT layer spec it builds, and MLA's low-rank compressed "
            "key/value projections (kv_a_proj_with_mqa, kv_b_proj; kv_lora_rank) have no "
            "counterpart in that spec"
        )
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise ConversionError(
        f"config.json: unknown architecture model_type={model_type!r} (supported: {known})"
    )


def resolve(config: dict[str, Any]) -> tuple[Architecture, HFModelShape]:
    """Validate ``config`` against its table row and return (row, normalised shape)."""
    arch = architecture_for(config)
    check_rope_variant(config)
    settings = HFSettings(config)
    if arch.check is not None:
        arch.check(settings)
    return arch, read_shape(settings)
