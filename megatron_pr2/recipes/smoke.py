"""Smoke assets of a recipe: its model's architecture at toy size, a tiny tokenizer, toy data.

Why: a recipe's ``smoke`` variant must run the *same* code path as the real job (a converted
checkpoint of the recipe's architecture, HF tokenizer files, dataset files in the recipe's
schema, math_verify rewards) on a CPU in minutes. The assets are built offline: the HF config
facts of :data:`megatron_pr2.recipes.models.KNOWN_HF_CONFIGS` scaled down
(:data:`SMOKE_SIZES`; ``model_type`` and the routing/normalisation flags are kept) and built with
transformers' own classes, random weights, saved with a character tokenizer, converted with
``pr2 convert hf-to-mcore``, plus train/val parquet files of one-digit additions.

Layout under ``OUT`` (the ``smoke`` variants name these paths, relative to the recipe)::

    OUT/hf/               config.json, *.safetensors, tokenizer files
    OUT/mcore/            pr2 convert hf-to-mcore output (pr2_model.json, tokenizer files)
    OUT/data/train.parquet, OUT/data/val.parquet
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_pr2.recipes.loader import Recipe, RecipeError
from megatron_pr2.recipes.models import load_hf_config
from megatron_pr2.recipes.smoke_data import (
    addition_problems,
    char_vocab_size,
    dapo_rows,
    gsm8k_rows,
    save_char_tokenizer,
    write_parquet,
)

__all__ = [
    "SMOKE_POLICY_SHAPE",
    "SMOKE_SIZES",
    "SmokeAssets",
    "make_smoke_assets",
    "smoke_hf_config",
    "write_smoke_data",
    "write_smoke_hf_model",
]

# Sizes of every smoke model (any HF spelling of the field that its config uses).
SMOKE_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 8,
    "intermediate_size": 48,  # dense FFN (qwen3_moe, deepseek); the expert FFN for olmoe
    "moe_intermediate_size": 16,
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 96,
    "max_position_embeddings": 256,
}
# What a recipe's ``smoke`` variant sets under policy.* (the check compares them to config.json).
SMOKE_POLICY_SHAPE = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_moe_experts": 8,
    "moe_router_topk": 2,
}
#: Validation questions: a fixed sample of the 100 training ones (the task has no others).
VAL_PROBLEMS = 32


@dataclass(frozen=True)
class SmokeAssets:
    """Where :func:`make_smoke_assets` wrote each part."""

    hf_dir: Path
    checkpoint: Path
    train_file: Path
    val_file: Path


def smoke_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``hf`` (a published config.json's fields) at :data:`SMOKE_SIZES`.

    Grouped-query attention stays grouped (2 key/value heads for 4 query heads) and
    multi-head stays multi-head; OLMoE's ``intermediate_size`` is its expert FFN (16)."""
    out = {k: v for k, v in hf.items() if v is not None}
    for key, value in SMOKE_SIZES.items():
        if key in hf or key in ("head_dim", "vocab_size", "max_position_embeddings"):
            out[key] = value
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv is not None:
        out["num_key_value_heads"] = (
            2 if heads and kv < heads else SMOKE_SIZES["num_attention_heads"]
        )
    if hf.get("model_type") == "olmoe":
        out["intermediate_size"] = SMOKE_SIZES["moe_intermediate_size"]
    if "first_k_dense_replace" in hf:
        out["first_k_dense_replace"] = min(int(hf["first_k_dense_replace"]), 1)
    if "mlp_only_layers" in hf:
        out["mlp_only_layers"] = []
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if hf.get(key):
            out[key] = 8 if key != "kv_lora_rank" else 16
    if "n_shared_experts" in hf:
        out["n_shared_experts"] = 1
    out["tie_word_embeddings"] = False
    # the character tokenizer's ids (smoke_data.SPECIALS): <pad> 0, <|im_end|> 2 ends a reply
    out.update(pad_token_id=0, eos_token_id=2, bos_token_id=None)
    out["vocab_size"] = max(int(out["vocab_size"]), char_vocab_size())
    return out


def write_smoke_hf_model(config: Mapping[str, Any], folder: Path, seed: int = 0) -> Path:
    """A random-weight HF model of ``config`` (transformers' class for its ``model_type``) with
    the character tokenizer, saved in ``folder``."""
    import torch
    import transformers

    from megatron_pr2.convert.architectures import architecture_for

    architecture_for(dict(config))  # refuse what pr2 convert cannot convert, before building
    values = dict(config)
    model_type = values.pop("model_type")
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(model_type, **values)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    save_char_tokenizer(folder)
    return folder


def write_smoke_data(folder: Path, schema: str = "dapo", seed: int = 0) -> tuple[Path, Path]:
    """``train.parquet`` (every one-digit addition) and ``val.parquet`` (a fixed sample of
    them) in ``schema``'s columns (``dapo``: DAPO-Math-17k; ``gsm8k``: question / answer
    ending in ``#### n``)."""
    rows = {"dapo": dapo_rows, "gsm8k": gsm8k_rows}.get(schema)
    if rows is None:
        raise ValueError(f"unknown smoke data schema {schema!r} (dapo, gsm8k)")
    train = write_parquet(folder / "train.parquet", rows(addition_problems(seed)))
    val_problems = addition_problems(seed + 1)[:VAL_PROBLEMS]
    val = write_parquet(folder / "val.parquet", rows(val_problems))
    return train, val


def data_schema(recipe: Recipe) -> str:
    """``gsm8k`` when the recipe reads GSM8K's columns (``data.prompt_key: question``)."""
    return "gsm8k" if recipe.get("data.prompt_key") == "question" else "dapo"


def make_smoke_assets(
    recipe: Recipe, out_dir: Path, convert: Callable[[Path, Path], None], seed: int = 0
) -> SmokeAssets:
    """Build the smoke assets of ``recipe``'s model in ``out_dir``; ``convert(hf_dir,
    mcore_dir)`` runs ``pr2 convert hf-to-mcore`` (a process group must be up for it)."""
    model = recipe.section("model")
    if not model:
        raise RecipeError("smoke assets need a model: section (name or hf_config)")
    # the published shape, not a smoke variant's own hf_config (which these assets become)
    facts = {k: v for k, v in model.items() if k != "hf_config"}
    hf, _ = load_hf_config(facts, recipe.base_dir)
    hf_dir = write_smoke_hf_model(smoke_hf_config(hf), out_dir / "hf", seed)
    checkpoint = out_dir / "mcore"
    convert(hf_dir, checkpoint)
    train, val = write_smoke_data(out_dir / "data", data_schema(recipe), seed)
    return SmokeAssets(hf_dir, checkpoint, train, val)
