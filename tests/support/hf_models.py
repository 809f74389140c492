"""Tiny random Hugging Face MoE models built with transformers' own classes (no download).

Seeded; norm weights (and q/k norms) are randomised so that a norm left at its init value by
the converter shows up in the logits. ``save(..., fused=True)`` writes the fused 3-D expert
layout (``save_original_format=False``); ``legacy_config_spelling`` rewrites config.json the way
transformers 4.x spells it (``num_experts`` / top-level ``rope_theta``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("qwen3_moe", "olmoe", "mixtral")

_COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def build_hf_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny fp32 ``*ForCausalLM`` of ``arch`` with random weights (norms included)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = {**_COMMON}
    if arch == "qwen3_moe":
        kwargs.update(
            num_experts=8, moe_intermediate_size=16, intermediate_size=48, head_dim=8,
            norm_topk_prob=True, rope_theta=1_000_000.0,
        )  # fmt: skip
        kwargs.update(overrides)
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kwargs))
    elif arch == "olmoe":
        kwargs.update(num_experts=8, intermediate_size=16, eos_token_id=None, pad_token_id=None)
        kwargs.update(overrides)
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**kwargs))
    elif arch == "mixtral":
        kwargs.update(num_local_experts=8, intermediate_size=16)
        kwargs.update(overrides)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model.float().eval()


def save(model: torch.nn.Module, folder: str | Path, fused: bool = False) -> Path:
    folder = Path(folder)
    model.save_pretrained(str(folder), save_original_format=not fused)
    return folder


def legacy_config_spelling(folder: str | Path) -> dict[str, Any]:
    """Rewrite ``config.json`` in transformers 4.x spelling; return the new dict."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if "num_local_experts" in config and config.get("model_type") != "mixtral":
        config["num_experts"] = config.pop("num_local_experts")
    params = config.pop("rope_parameters", None) or {}
    if "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]
    path.write_text(json.dumps(config, indent=2))
    return config


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` fp32 logits of an HF causal LM."""
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def mcore_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` logits of a world-1 (single chunk) megatron GPTModel."""
    (model,) = chunks
    model.eval()
    seq = tokens.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None).float()
