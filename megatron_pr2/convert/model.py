"""The JSON model description written next to a converted checkpoint, and the model builder.

A megatron dist checkpoint holds tensors only. ``pr2_model.json`` holds what is needed to
rebuild the same megatron-core GPT in any layout (TransformerConfig kwargs, GPTModel kwargs,
vocabulary and sequence length, the q/k norm kind) plus the original HF ``config.json`` for the
way back, so the trainer can call :func:`build_model_chunks_from_description` on a checkpoint
directory without knowing where it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.convert.errors import ConversionError

DESCRIPTION_NAME = "pr2_model.json"
FORMAT = "megatron-pr2/converted-model"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


@dataclass
class ModelDescription:
    """Everything but the tensors: enough to rebuild the model and to convert back to HF."""

    architecture: str
    transformer_config: dict[str, Any]
    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    share_embeddings_and_output_weights: bool
    qk_norm: str | None
    hf_config: dict[str, Any]
    dtype: str = "float32"
    has_predictor: bool = True
    saved_layout: dict[str, Any] = field(default_factory=dict)
    checkpoint_format: str = "torch_dist"

    def to_json(self) -> str:
        payload = {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = DESCRIPTION_NAME) -> ModelDescription:
        """Parse and check format, version and keys (errors name the key)."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{source}: not valid JSON ({exc})") from None
        if payload.pop("format", None) != FORMAT:
            raise ConversionError(f"{source}: not a {FORMAT} description (key 'format')")
        version = payload.pop("version", None)
        if version != VERSION:
            raise ConversionError(f"{source}: key 'version' is {version!r}, expected {VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise ConversionError(f"{source}: unknown key {unknown[0]!r}")
        try:
            return cls(**payload)
        except TypeError as exc:
            raise ConversionError(f"{source}: {exc}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def save_model_description(description: ModelDescription, directory: str | Path) -> Path:
    """Write ``pr2_model.json`` into ``directory``."""
    path = Path(directory) / DESCRIPTION_NAME
    path.write_text(description.to_json())
    return path


def load_converted_model_description(path: str | Path) -> ModelDescription:
    """The description of a converted checkpoint (its directory or the JSON file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / DESCRIPTION_NAME
    if not path.is_file():
        raise ConversionError(f"{path}: no {DESCRIPTION_NAME} (not a converted checkpoint?)")
    return ModelDescription.from_json(path.read_text(), source=str(path))


def transformer_config_from_description(description: ModelDescription, **overrides: Any):
    """``TransformerConfig`` for the current parallel state (CPU-safe defaults of
    :func:`megatron_pr2.models.gpt.moe_transformer_config`), dtype from the description."""
    from megatron_pr2.models.gpt import TinyMoEShape, moe_transformer_config

    kwargs = dict(description.transformer_config)
    activation = kwargs.pop("activation", "silu")
    if activation not in _ACTIVATIONS:
        raise ConversionError(f"{DESCRIPTION_NAME}: unknown activation {activation!r}")
    kwargs["activation_func"] = _ACTIVATIONS[activation]
    dtype = description.torch_dtype
    kwargs.update(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    shape = TinyMoEShape(
        num_layers=kwargs["num_layers"],
        hidden_size=kwargs["hidden_size"],
        ffn_hidden_size=kwargs["moe_ffn_hidden_size"],
        num_attention_heads=kwargs["num_attention_heads"],
        num_moe_experts=kwargs["num_moe_experts"],
        moe_router_topk=kwargs["moe_router_topk"],
    )
    kwargs.update(overrides)
    return moe_transformer_config(shape, **kwargs)


def _with_full_qk_norm(spec: Any) -> Any:
    """Copy of a decoder spec whose self-attention q/k norms span all heads (OLMoE)."""
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_pr2.convert.qk_norm import FullKeyRMSNorm, FullQueryRMSNorm

    def rewrite(node: Any) -> Any:
        if isinstance(node, SelfAttentionSubmodules):
            return dataclasses.replace(
                node, q_layernorm=FullQueryRMSNorm, k_layernorm=FullKeyRMSNorm
            )
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if isinstance(node, functools.partial):
            keywords = {k: rewrite(v) for k, v in node.keywords.items()}
            return functools.partial(node.func, *node.args, **keywords)
        if isinstance(node, ModuleSpec):
            return dataclasses.replace(node, submodules=rewrite(node.submodules))
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: rewrite(getattr(node, f.name)) for f in dataclasses.fields(node)}
            return dataclasses.replace(node, **changes)
        return node

    return rewrite(spec)


def build_model_chunks_from_description(
    description: ModelDescription,
    replay_config: Any = None,
    config: Any = None,
    planned_dispatch: bool = False,
    **config_overrides: Any,
) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage) for ``description``.

    Routers are the project's :class:`~megatron_pr2.patch.router.ReplayTopKRouter` (through
    :func:`~megatron_pr2.patch.with_replay_router`) when ``replay_config`` installs them;
    ``mode="pr2"`` adds the zero-initialised evolution predictor. ``config`` (a
    ``TransformerConfig``) replaces the one built from the description and ``config_overrides``.
    ``planned_dispatch``: MoE layers take all-to-all sizes from a replay plan
    (``replay.dispatch_plan``), as in ``models.gpt.build_model_chunks``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_pr2.patch import apply_compat_fixes, with_replay_router
    from megatron_pr2.patch.spec import with_planned_dispatch

    if config is None:
        config = transformer_config_from_description(description, **config_overrides)
    installs = replay_config is not None and getattr(
        replay_config, "installs_router", replay_config.enabled
    )
    apply_compat_fixes()
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=stage)
        if description.qk_norm == "full":
            spec = _with_full_qk_norm(spec)
        if installs:
            spec = with_replay_router(spec, replay_config)
        if planned_dispatch:
            spec = with_planned_dispatch(spec)
        rotary_base = description.rotary_base
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=description.vocab_size,
                max_sequence_length=description.max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                share_embeddings_and_output_weights=description.share_embeddings_and_output_weights,
                position_embedding_type="rope",
                rotary_base=int(rotary_base) if float(rotary_base).is_integer() else rotary_base,
                vp_stage=stage,
            )
        )
    return chunks


def checkpoint_state_key(num_chunks: int, index: int) -> str:
    """Top-level key of chunk ``index`` in the saved state (megatron-LM's convention)."""
    return "model" if num_chunks == 1 else f"model{index}"
