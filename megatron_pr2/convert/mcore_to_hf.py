"""megatron-core ``torch_dist`` checkpoint (any layout) -> Hugging Face folder.

Runs on one process: the checkpoint is loaded into a world-1 model built from
``pr2_model.json`` (``dist_checkpointing`` reshards whatever layout saved it), then HF tensors
are produced one parameter at a time into size-bounded safetensors shards. Predictor weights
are dropped, or written to ``pr2_predictor.safetensors`` beside the model on request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_pr2.convert.architectures import architecture_for
from megatron_pr2.convert.atomic import atomic_output_dir
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_config import read_shape
from megatron_pr2.convert.hf_to_mcore import ConversionStats
from megatron_pr2.convert.layout import ConvertLayout
from megatron_pr2.convert.mapping import Ranks, classify, to_hf
from megatron_pr2.convert.model import (
    ModelDescription,
    build_model_chunks_from_description,
    checkpoint_state_key,
    load_converted_model_description,
)
from megatron_pr2.convert.progress import progress
from megatron_pr2.convert.runtime import init_parallel_state, world_size
from megatron_pr2.convert.safetensors_io import PREDICTOR_FILE, ShardedSafetensorsWriter

EXPERT_LAYOUTS = ("per_expert", "fused")


def _load_error(ckpt_dir: Path, what: str, exc: BaseException) -> ConversionError:
    """One line for a failed read: the damaged file when one explains it, else the last line
    of megatron's/torch's message (their multi-line text ends with the reason)."""
    from megatron_pr2.models.checkpoint_files import find_damaged_file

    problem = find_damaged_file(ckpt_dir)
    if problem is not None:
        return ConversionError(problem)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return ConversionError(f"{ckpt_dir}: cannot {what}: {reason}")


def _checkpoint_has_predictor(ckpt_dir: Path) -> bool:
    from megatron.core import dist_checkpointing

    try:
        keys = dist_checkpointing.load_tensors_metadata(str(ckpt_dir)).keys()
    except Exception as exc:  # megatron raises several types for a missing/corrupt checkpoint
        raise _load_error(ckpt_dir, "read the dist checkpoint metadata", exc) from None
    return any("evolution_predictor" in k for k in keys)


def load_chunks(ckpt_dir: Path, description: ModelDescription) -> list:
    """World-1 chunks with the checkpoint's weights (a missing tensor names its key)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_pr2.config import RouterReplayConfig

    has_predictor = _checkpoint_has_predictor(ckpt_dir)
    replay = RouterReplayConfig(mode="pr2" if has_predictor else "none")
    # every weight is overwritten: skip megatron's random init (and its full-size buffers)
    chunks = build_model_chunks_from_description(description, replay, perform_initialization=False)
    state = {
        checkpoint_state_key(len(chunks), i): chunk.sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }
    try:
        loaded = dist_checkpointing.load(state, str(ckpt_dir))
    except (Exception, CheckpointException) as exc:  # torch's is a BaseException
        raise _load_error(ckpt_dir, "load the checkpoint", exc) from None
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[checkpoint_state_key(len(chunks), i)])
    return chunks


def _hf_config_for_output(description: ModelDescription) -> dict:
    config = dict(description.hf_config)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = description.dtype
    if "dtype" not in config and "torch_dtype" not in config:
        config["torch_dtype"] = description.dtype
    return config


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    expert_layout: str = "per_expert",
    save_predictor: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    show_progress: bool = True,
    description_path: str | Path | None = None,
) -> ConversionStats:
    """Convert a converted (or trained) checkpoint back to an HF folder; world 1 only.

    ``description_path``: the ``pr2_model.json`` of the conversion, for a checkpoint the
    trainer wrote elsewhere (default: the one inside ``ckpt_dir``).
    """
    start = time.perf_counter()
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConversionError(
            f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}"
        )
    if world_size() != 1:
        raise ConversionError("mcore-to-hf runs on one process (it reads any saved layout)")
    ckpt_dir = Path(ckpt_dir)
    description = load_converted_model_description(description_path or ckpt_dir)
    arch = architecture_for(description.hf_config)
    shape = read_shape(description.hf_config)
    fused = expert_layout == "fused"
    stats = ConversionStats()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        init_parallel_state(ConvertLayout())
        chunks = load_chunks(ckpt_dir, description)
        ranks = Ranks.current(shape.num_experts)
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        predictor: dict[str, torch.Tensor] = {}
        stacks: dict[str, list[torch.Tensor | None]] = {}
        refs = [item for chunk in chunks for item in classify(chunk, ranks)]
        for ref, param in progress(refs, len(refs), "mcore-to-hf", show_progress):
            tensor = param.detach()
            if ref.role == "predictor":
                predictor[ref.global_name] = tensor.float().contiguous()
                continue
            if ref.role == "output" and description.share_embeddings_and_output_weights:
                continue
            # one dtype for the HF folder: megatron's local-spec norms stay fp32 in bf16 models
            tensor = tensor.to(description.torch_dtype)
            for name, value in to_hf(arch, shape, ref, tensor, fused).items():
                if not name.endswith("]"):
                    writer.add(name, value)
                    continue
                base, index = name[:-1].rsplit("[", 1)
                parts = stacks.setdefault(base, [None] * shape.num_experts)
                parts[int(index)] = value
                if all(p is not None for p in parts):
                    writer.add(base, torch.stack(parts))  # type: ignore[arg-type]
                    del stacks[base]
            stats.tensors += 1
            stats.bytes_read += tensor.numel() * tensor.element_size()
        if stacks:
            raise ConversionError(f"fused expert tensor {next(iter(stacks))!r} is incomplete")
        writer.close()
        (tmp / "config.json").write_text(
            json.dumps(_hf_config_for_output(description), indent=2, sort_keys=True)
        )
        if save_predictor and predictor:
            from safetensors.torch import save_file

            save_file(predictor, str(tmp / PREDICTOR_FILE), metadata={"format": "pt"})
    stats.seconds = time.perf_counter() - start
    return stats
