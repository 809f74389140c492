"""Read a Hugging Face ``config.json`` into one normalised description of the model shape.

transformers 4.x and 5.x spell the same config differently (``num_experts`` vs
``num_local_experts``, top-level ``rope_theta`` vs ``rope_parameters.rope_theta``); a file
written by one major version must convert the same as one written by the other, so every
spelling is read here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_pr2.convert.errors import ConversionError

_MISSING = object()


@dataclass(frozen=True)
class HFModelShape:
    """What the converter needs from an HF config, whatever spelling it came in."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    moe_topk: int
    moe_ffn_hidden_size: int
    dense_ffn_hidden_size: int
    moe_layers: tuple[bool, ...]
    rope_theta: float
    rms_norm_eps: float
    norm_topk_prob: bool
    tie_word_embeddings: bool
    max_position_embeddings: int


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of an HF folder (kept verbatim for the way back)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: no config.json in the Hugging Face folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def _get(config: dict[str, Any], *names: str, default: Any = _MISSING) -> Any:
    """First present key among ``names`` (the spellings of one setting)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is _MISSING:
        spelled = " / ".join(repr(n) for n in names)
        raise ConversionError(f"config.json: missing key {spelled}")
    return default


def rope_theta(config: dict[str, Any]) -> float:
    """``rope_theta`` (4.x, top level) or ``rope_parameters.rope_theta`` (5.x); only plain RoPE."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise ConversionError(
                f"config.json: {source}.rope_type={kind!r} is not supported (plain RoPE only)"
            )
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(_get(config, "rope_theta", default=10000.0))


def moe_layer_pattern(config: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Which layers are MoE: Qwen-style ``decoder_sparse_step`` / ``mlp_only_layers``."""
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return tuple((i not in dense) and (i + 1) % step == 0 for i in range(num_layers))


def read_shape(config: dict[str, Any]) -> HFModelShape:
    """Normalise ``config`` (either transformers spelling) into an :class:`HFModelShape`."""
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    num_layers = int(_get(config, "num_hidden_layers"))
    moe_ffn = int(_get(config, "moe_intermediate_size", "intermediate_size"))
    return HFModelShape(
        model_type=str(_get(config, "model_type")),
        vocab_size=int(_get(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(_get(config, "num_key_value_heads", default=heads)),
        head_dim=int(_get(config, "head_dim", default=hidden // heads)),
        num_experts=int(_get(config, "num_experts", "num_local_experts", "n_routed_experts")),
        moe_topk=int(_get(config, "num_experts_per_tok")),
        moe_ffn_hidden_size=moe_ffn,
        dense_ffn_hidden_size=int(_get(config, "intermediate_size", default=moe_ffn)),
        moe_layers=moe_layer_pattern(config, num_layers),
        rope_theta=rope_theta(config),
        rms_norm_eps=float(_get(config, "rms_norm_eps", default=1e-6)),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(_get(config, "max_position_embeddings", default=4096)),
    )
