"""Hugging Face folder -> megatron-core ``torch_dist`` checkpoint + ``pr2_model.json``.

Collective over the current process group: every rank builds its own chunks of the model in
the target layout (the project's replay router, predictor at zero), fills each parameter from
the safetensors files (reading only what that rank holds) and megatron's ``dist_checkpointing``
writes the checkpoint. Peak memory is this rank's model shard plus the HF tensors of one
parameter.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.convert.architectures import HF_LM_HEAD, Architecture, resolve
from megatron_pr2.convert.atomic import agree, atomic_output_dir
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_config import HFModelShape, read_config_json
from megatron_pr2.convert.layout import ConvertLayout
from megatron_pr2.convert.mapping import HFToMegatron, Ranks, classify
from megatron_pr2.convert.model import (
    ModelDescription,
    build_model_chunks_from_description,
    checkpoint_state_key,
    save_model_description,
)
from megatron_pr2.convert.progress import progress
from megatron_pr2.convert.runtime import init_parallel_state, world_size
from megatron_pr2.convert.safetensors_io import PREDICTOR_FILE, SafetensorsReader

_DTYPE_NAMES = {"float32", "bfloat16", "float16"}


@dataclass
class ConversionStats:
    """What one conversion did (this rank's view for bytes; wall time of the whole call)."""

    tensors: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def resolve_dtype(config: dict[str, Any], dtype: str) -> str:
    """``auto`` means the HF config's own dtype (either key spelling), else float32."""
    if dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = dtype.replace("torch.", "")
    if dtype not in _DTYPE_NAMES:
        raise ConversionError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    return dtype


def describe(
    config: dict[str, Any],
    dtype: str = "auto",
    pad_vocab_multiple: int = 1,
    max_sequence_length: int | None = None,
    with_predictor: bool = True,
) -> tuple[Architecture, HFModelShape, ModelDescription]:
    """The architecture row, normalised shape and model description for an HF config."""
    arch, shape = resolve(config)
    padded = -(-shape.vocab_size // pad_vocab_multiple) * pad_vocab_multiple
    description = ModelDescription(
        architecture=arch.name,
        transformer_config=arch.megatron_kwargs(shape),
        vocab_size=padded,
        max_sequence_length=max_sequence_length or shape.max_position_embeddings,
        rotary_base=shape.rope_theta,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        qk_norm=arch.qk_norm,
        hf_config=config,
        dtype=resolve_dtype(config, dtype),
        has_predictor=with_predictor,
    )
    return arch, shape, description


def _unused_tensors(reader: SafetensorsReader, shape: HFModelShape) -> list[str]:
    """HF tensors no rank read: an unsupported variant would otherwise be dropped silently."""
    import torch.distributed as dist

    read = set(reader.read_names)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[set[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, read)
        read = set().union(*[g for g in gathered if g])
    if shape.tie_word_embeddings:
        read.add(HF_LM_HEAD)
    return [n for n in reader.names() if n not in read]


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    layout: ConvertLayout | None = None,
    dtype: str = "auto",
    with_predictor: bool = True,
    pad_vocab_multiple: int = 1,
    max_sequence_length: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> tuple[ModelDescription, ConversionStats]:
    """Convert (collective over the current process group, which must match ``layout``).

    Initialises megatron's parallel state for ``layout``. Raises :class:`ConversionError`
    naming the tensor, key or file for bad input and for a layout that does not divide the
    model; on any failure nothing is left at ``out_dir``.
    """
    from megatron.core import dist_checkpointing

    from megatron_pr2.config import RouterReplayConfig

    start = time.perf_counter()
    layout = layout or ConvertLayout()
    config = read_config_json(hf_dir)
    arch, shape, description = describe(
        config, dtype, pad_vocab_multiple, max_sequence_length, with_predictor
    )
    layout.check(description.transformer_config, description.vocab_size, world_size())
    reader = SafetensorsReader(hf_dir)
    side = Path(hf_dir) / PREDICTOR_FILE
    predictor_reader = (
        SafetensorsReader(hf_dir, only=PREDICTOR_FILE)
        if with_predictor and side.is_file()
        else None
    )
    description.saved_layout = layout.to_dict()
    stats = ConversionStats()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        init_parallel_state(layout)
        replay = RouterReplayConfig(mode="pr2" if with_predictor else "none")
        # every weight is overwritten: skip megatron's random init (and its full-size buffers)
        chunks = build_model_chunks_from_description(
            description, replay, perform_initialization=False
        )
        ranks = Ranks.current(shape.num_experts)
        loader = HFToMegatron(arch, shape, reader, ranks, description.vocab_size, predictor_reader)
        error: BaseException | None = None
        try:
            refs = [item for chunk in chunks for item in classify(chunk, ranks)]
            show = show_progress and ranks.tp_rank == 0 and _is_rank0()
            with torch.no_grad():
                for ref, param in progress(refs, len(refs), "hf-to-mcore", show):
                    value = loader.load(ref)
                    if tuple(value.shape) != tuple(param.shape):
                        raise ConversionError(
                            f"megatron parameter {ref.global_name!r}: built shape "
                            f"{list(value.shape)} from HF tensors, the model expects "
                            f"{list(param.shape)}"
                        )
                    param.copy_(value.to(param.dtype))
                    stats.tensors += 1
                    stats.bytes_read += value.numel() * value.element_size()
        except Exception as exc:  # every rank must learn of it before the collective save
            error = exc
        agree(error)
        unused = _unused_tensors(reader, shape)
        agree(
            ConversionError(
                f"HF tensor {unused[0]!r} is not used by the {arch.name} mapping "
                f"({len(unused)} unused; unsupported model variant?)"
            )
            if unused
            else None
        )
        state = {
            checkpoint_state_key(len(chunks), i): chunk.sharded_state_dict()
            for i, chunk in enumerate(chunks)
        }
        dist_checkpointing.save(state, str(tmp))
        if _is_rank0():
            save_model_description(description, tmp)
            copy_tokenizer_files(hf_dir, tmp)
    stats.seconds = time.perf_counter() - start
    return description, stats


#: Files of a Hugging Face tokenizer (and its chat template) that travel with the weights, so
#: ``policy.model_path`` alone gives the trainer its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files ``hf_dir`` has into ``out_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(hf_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
