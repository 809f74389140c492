"""MoE model shapes read from Hugging Face ``config.json`` files, and parameter counts.

``pr2 check-recipe`` never downloads: the shape comes from ``model.hf_config`` (a
``config.json`` or a checkpoint folder holding one) or, when that is not given, from
:data:`KNOWN_HF_CONFIGS`, the fields of the published configs the recipes target.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_HF_CONFIGS", "ModelShape", "load_hf_config", "shape_from_hf", "shape_from_policy"]

# The fields of the published config.json files that the checks and the estimate read.
KNOWN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B(-Base): 48 layers, all MoE, 128 experts top-8, GQA 32/4, head_dim 128.
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    # allenai/OLMoE-1B-7B-0924(-Instruct): 16 layers, 64 experts top-8, MHA 16 heads.
    "allenai/OLMoE-1B-7B-0924": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "vocab_size": 50304,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # moonshotai/Moonlight-16B-A3B(-Instruct): DeepSeek-V3 architecture, MLA, first layer
    # dense, 64 routed experts top-6 + 2 shared, sigmoid scores with expert bias (noaux_tc).
    "moonshotai/Moonlight-16B-A3B": {
        "model_type": "deepseek_v3",
        "hidden_size": 2048,
        "intermediate_size": 11264,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "routed_scaling_factor": 2.446,
        "norm_topk_prob": True,
        "vocab_size": 163840,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
}
KNOWN_HF_CONFIGS["Qwen/Qwen3-30B-A3B-Base"] = KNOWN_HF_CONFIGS["Qwen/Qwen3-30B-A3B"]
KNOWN_HF_CONFIGS["allenai/OLMoE-1B-7B-0924-Instruct"] = KNOWN_HF_CONFIGS["allenai/OLMoE-1B-7B-0924"]
KNOWN_HF_CONFIGS["moonshotai/Moonlight-16B-A3B-Instruct"] = KNOWN_HF_CONFIGS[
    "moonshotai/Moonlight-16B-A3B"
]


@dataclass(frozen=True)
class ModelShape:
    """What the parallel checks and the memory estimate need from a MoE decoder."""

    model_type: str
    num_layers: int
    moe_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # = key/value heads; MLA has one latent, shared by all heads
    num_experts: int
    topk: int
    moe_ffn_hidden_size: int
    dense_ffn_hidden_size: int
    shared_expert_ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_params_per_layer: int
    router_bias: bool  # sigmoid / noaux_tc expert bias (one float per expert)
    # attention widths, for the activation estimate (0: MHA defaults from hidden and groups)
    q_width: int = 0  # query projection output (heads x q head dim)
    kv_width: int = 0  # key + value projection outputs together
    attn_out_width: int = 0  # core attention output = output projection input

    def attention_widths(self) -> tuple[int, int, int]:
        """``(q, k + v, attention output)`` widths of one token."""
        h = self.hidden_size
        q = self.q_width or h
        kv = self.kv_width or 2 * h * self.num_query_groups // self.num_attention_heads
        return q, kv, self.attn_out_width or q

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    def expert_params_per_layer(self) -> int:
        """Routed experts of one MoE layer (SwiGLU: gate, up and down projections)."""
        return self.num_experts * 3 * self.hidden_size * self.moe_ffn_hidden_size

    def non_expert_params(self) -> int:
        """Everything except the routed experts: embeddings, attention, norms, dense MLPs,
        shared experts and routers (predictor excluded)."""
        h = self.hidden_size
        per_layer = self.attention_params_per_layer + 2 * h
        dense_mlp = 3 * h * self.dense_ffn_hidden_size
        moe_extra = self.num_experts * h + 3 * h * self.shared_expert_ffn_hidden_size
        if self.router_bias:
            moe_extra += self.num_experts
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (
            self.num_layers * per_layer
            + self.dense_layers * dense_mlp
            + self.moe_layers * moe_extra
            + embeddings
            + h
        )

    def total_params(self) -> int:
        return self.non_expert_params() + self.moe_layers * self.expert_params_per_layer()

    def predictor_params(self) -> int:
        """PR2 evolution predictors: one bias-free ``hidden -> experts`` linear per MoE layer."""
        return self.moe_layers * self.hidden_size * self.num_experts


def load_hf_config(model: Mapping[str, Any], base_dir: Path) -> tuple[dict[str, Any], str]:
    """The HF config of a recipe's ``model:`` section and where it came from."""
    source = model.get("hf_config")
    if source:
        path = Path(str(source)).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model.hf_config: {path} does not exist")
        return json.loads(path.read_text()), str(path)
    name = model.get("name")
    if name in KNOWN_HF_CONFIGS:
        return dict(KNOWN_HF_CONFIGS[str(name)]), f"built-in shape of {name}"
    known = ", ".join(sorted(KNOWN_HF_CONFIGS))
    raise KeyError(
        f"model.name={name!r} has no built-in shape and model.hf_config is not set; "
        f"point model.hf_config at its config.json (built-in: {known})"
    )


def _need(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise KeyError(f"HF config has none of {', '.join(keys)}")


def shape_from_hf(cfg: Mapping[str, Any]) -> ModelShape:
    """Shape of a ``qwen3_moe`` / ``qwen2_moe`` / ``olmoe`` / ``mixtral`` / ``deepseek_v3`` config."""
    kind = str(cfg.get("model_type", ""))
    h = int(_need(cfg, "hidden_size"))
    layers = int(_need(cfg, "num_hidden_layers"))
    heads = int(_need(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    vocab = int(_need(cfg, "vocab_size"))
    topk = int(_need(cfg, "num_experts_per_tok"))
    tie = bool(cfg.get("tie_word_embeddings", False))
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    if kind == "deepseek_v3":
        experts = int(_need(cfg, "n_routed_experts"))
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        moe_layers = sum(1 for i in range(first_dense, layers) if i % freq == 0)
        moe_ffn = int(_need(cfg, "moe_intermediate_size"))
        dense_ffn = int(_need(cfg, "intermediate_size"))
        shared = int(cfg.get("n_shared_experts") or 0) * moe_ffn
        nope, rope = int(_need(cfg, "qk_nope_head_dim")), int(_need(cfg, "qk_rope_head_dim"))
        v_dim, kv_rank = int(_need(cfg, "v_head_dim")), int(_need(cfg, "kv_lora_rank"))
        q_rank = cfg.get("q_lora_rank")
        q_params = (
            h * heads * (nope + rope)
            if not q_rank
            else h * int(q_rank) + int(q_rank) + int(q_rank) * heads * (nope + rope)
        )
        attn = (
            q_params
            + h * (kv_rank + rope)
            + kv_rank
            + kv_rank * heads * (nope + v_dim)
            + heads * v_dim * h
        )
        router_bias = str(cfg.get("topk_method", "")) == "noaux_tc"
        query_groups = heads
        # MLA: per-head keys and values after the up-projection, plus the compressed latent
        widths = (heads * (nope + rope), heads * (nope + v_dim) + kv_rank + rope, heads * v_dim)
    elif kind in ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral"):
        experts = int(_need(cfg, "num_experts", "num_local_experts"))
        sparse_step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(
            1 for i in range(layers) if i not in mlp_only and (i + 1) % sparse_step == 0
        )
        moe_ffn = int(_need(cfg, "moe_intermediate_size", "intermediate_size"))
        dense_ffn = int(cfg.get("intermediate_size") or 0)
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        head_dim = int(cfg.get("head_dim") or h // heads)
        attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
        if kind == "qwen3_moe":
            attn += 2 * head_dim  # q/k RMSNorm per head dim
        elif kind == "olmoe":
            attn += heads * head_dim + kv_heads * head_dim  # q/k RMSNorm over all heads
        router_bias = False
        query_groups = kv_heads
        widths = (heads * head_dim, 2 * kv_heads * head_dim, heads * head_dim)
    else:
        raise ValueError(
            f"model_type {kind!r} is not supported "
            "(qwen3_moe, qwen2_moe, olmoe, mixtral, deepseek_v3)"
        )
    return ModelShape(
        model_type=kind,
        num_layers=layers,
        moe_layers=moe_layers,
        hidden_size=h,
        num_attention_heads=heads,
        num_query_groups=query_groups,
        num_experts=experts,
        topk=topk,
        moe_ffn_hidden_size=moe_ffn,
        dense_ffn_hidden_size=dense_ffn,
        shared_expert_ffn_hidden_size=shared,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        attention_params_per_layer=attn,
        router_bias=router_bias,
        q_width=widths[0],
        kv_width=widths[1],
        attn_out_width=widths[2],
    )


def shape_from_policy(policy: Mapping[str, Any], vocab_size: int = 64) -> ModelShape:
    """The trainer's own tiny MoE GPT (no ``model:`` section): every layer MoE, MHA, no bias.

    ``vocab_size`` is a stand-in (the synthetic task's tokenizer decides it); it only moves the
    embedding term of the estimate.
    """
    from megatron_pr2.rl.config import PolicyConfig

    defaults = PolicyConfig()
    h = int(policy.get("hidden_size", defaults.hidden_size))
    heads = int(policy.get("num_attention_heads", defaults.num_attention_heads))
    layers = int(policy.get("num_layers", defaults.num_layers))
    seq = int(policy.get("max_total_sequence_length") or 0)
    return ModelShape(
        model_type="tiny_gpt",
        num_layers=layers,
        moe_layers=layers,
        hidden_size=h,
        num_attention_heads=heads,
        num_query_groups=heads,
        num_experts=int(policy.get("num_moe_experts", defaults.num_moe_experts)),
        topk=int(policy.get("moe_router_topk", defaults.moe_router_topk)),
        moe_ffn_hidden_size=int(policy.get("ffn_hidden_size", defaults.ffn_hidden_size)),
        dense_ffn_hidden_size=0,
        shared_expert_ffn_hidden_size=0,
        vocab_size=vocab_size,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        attention_params_per_layer=4 * h * h,
        router_bias=False,
    )
