"""megatron-core training plumbing: DDP wrapping, the optimizer with the predictor group, one
optimizer step over microbatches, and dist-checkpoint save/resume of model and optimizer."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_pr2.models.gpt import lm_forward_backward, lm_forward_step
from megatron_pr2.patch.distrib_optim import torch_adam_loading
from megatron_pr2.patch.float16_optim import fp32_params_as_main_params
from megatron_pr2.predictor.module import PREDICTOR_ATTR
from megatron_pr2.predictor.optim import (
    apply_group_lrs,
    predictor_config_overrides,
    predictor_frozen_unless,
)

PREDICTOR_KEY_FRAGMENT = "evolution_predictor"


@dataclass
class TrainingSetup:
    chunks: list[DistributedDataParallel]
    optimizer: Any

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The unwrapped model chunks."""
        return [chunk.module for chunk in self.chunks]


def setup_training(
    chunks: Sequence[torch.nn.Module],
    lr: float,
    predictor_lr_mult: float = 1000.0,
    weight_decay: float = 0.0,
    use_distributed_optimizer: bool = False,
    clip_grad: float = 0.0,
) -> TrainingSetup:
    """Wrap chunks in megatron DDP and build megatron's optimizer (predictor in its own group)."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=0.0,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        params_dtype=config.params_dtype,
        bf16=config.bf16,
        fp16=config.fp16,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(
        opt_config,
        wrapped,
        config_overrides=predictor_config_overrides(opt_config, predictor_lr_mult),
    )
    apply_group_lrs(optimizer)
    return TrainingSetup(wrapped, optimizer)


def train_step(
    setup: TrainingSetup,
    batches: Sequence[Any],
    predictor_active: bool = False,
    forward_step_func: Callable = lm_forward_step,
) -> tuple[list[dict[str, torch.Tensor]], float | None]:
    """Zero grads, one forward/backward pass over ``batches``, one optimizer step.

    ``predictor_active``: this step carries the predictor loss; otherwise the predictor group
    is frozen for the step. Replay (``session.replaying``) is set up by the caller. Returns the
    per-microbatch loss dicts (last pipeline stage) and the gradient norm.
    """
    for chunk in setup.chunks:
        chunk.zero_grad_buffer()
    setup.optimizer.zero_grad()
    losses = lm_forward_backward(setup.chunks, batches, forward_step_func=forward_step_func)
    with predictor_frozen_unless(setup.optimizer, predictor_active):
        _, grad_norm, _ = setup.optimizer.step()
    return losses, (None if grad_norm is None else float(grad_norm))


# ------------------------------------------------------------------ checkpoints
def _model_sharded_state_dict(setup: TrainingSetup) -> dict:
    if len(setup.modules) == 1:
        return {"model": setup.modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(setup.modules)}


def save_checkpoint(setup: TrainingSetup, directory: str | Path) -> None:
    """Model and optimizer to a megatron ``torch_dist`` checkpoint (any layout can load it)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    state = _model_sharded_state_dict(setup)
    with fp32_params_as_main_params(setup.optimizer):  # bf16 optimizer, fp32 norms/predictor
        optimizer = setup.optimizer.sharded_state_dict(_flat(state), metadata=_OPTIM_METADATA)
    state["optimizer"] = optimizer
    dist_checkpointing.save(state, str(directory))


# megatron's distributed optimizer defaults to 'fully_sharded_model_space', whose flattened
# ShardedTensors its own dist_checkpointing refuses to save ("flattened_range is not
# supported"); 'fully_reshardable' saves per-parameter state any layout can load. Optimizers
# that are not distributed ignore the key.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _flat(model_state: dict) -> dict:
    if "model" in model_state:
        return model_state["model"]
    merged: dict = {}
    for part in model_state.values():
        merged.update(part)
    return merged


def load_checkpoint(
    setup: TrainingSetup, directory: str | Path, load_optimizer: bool = True
) -> None:
    """Load a checkpoint saved in any layout. Predictor weights missing from it (a base
    model's checkpoint) stay at their zero init, with a warning; anything else missing fails.
    A missing, truncated or corrupt file is a :class:`CheckpointFileError` naming it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_pr2.models.checkpoint_files import loading_error

    try:
        _load_checkpoint(setup, directory, load_optimizer)
    except (Exception, CheckpointException) as exc:  # torch's is a BaseException
        error = loading_error(directory, exc)
        if error is None:
            raise
        raise error from None


def _load_checkpoint(setup: TrainingSetup, directory: str | Path, load_optimizer: bool) -> None:
    with contextlib.ExitStack() as stack:
        _load_model_and_optimizer(setup, directory, load_optimizer, stack)


def _load_model_and_optimizer(
    setup: TrainingSetup, directory: str | Path, load_optimizer: bool, stack: contextlib.ExitStack
) -> None:
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state = _model_sharded_state_dict(setup)
    missing_predictor = _drop_missing_predictor_keys(state, directory)
    unused_predictor = _unused_predictor_keys(state, directory)
    load_optimizer = load_optimizer and not missing_predictor and not unused_predictor
    if load_optimizer:
        # megatron-core bugs: torch Adam (no TE/apex) in the distributed optimizer, fp32 params
        # (CPU norms, predictor) in the bf16 one; both fixed on the instances while loading
        stack.enter_context(torch_adam_loading(setup.optimizer))
        stack.enter_context(fp32_params_as_main_params(setup.optimizer))
        state["optimizer"] = setup.optimizer.sharded_state_dict(
            _flat(state), is_loading=True, metadata=_OPTIM_METADATA
        )
    # A model without predictor (r2, r3, none) may start from a PR2 checkpoint: only then are
    # unexpected keys allowed, and only the predictor's.
    strict = StrictHandling.LOG_UNEXPECTED if unused_predictor else StrictHandling.RAISE_ALL
    loaded = dist_checkpointing.load(state, str(directory), strict=strict)
    for i, module in enumerate(setup.modules):
        key = "model" if len(setup.modules) == 1 else f"model{i}"
        module.load_state_dict(loaded[key], strict=not missing_predictor)
    if load_optimizer:  # (``loaded`` always carries the checkpoint's common, non-tensor state)
        setup.optimizer.load_state_dict(loaded["optimizer"])
    if missing_predictor:
        warnings.warn(
            f"checkpoint {directory} has no predictor weights ({len(missing_predictor)} tensors); "
            "they start at zero (PR2 behaves as R2 until trained); optimizer state not loaded",
            stacklevel=3,  # the caller of load_checkpoint
        )


def _unused_predictor_keys(state: dict, directory: str | Path) -> list[str]:
    """Predictor tensors in the checkpoint that this model does not have (it has none)."""
    requested = {
        getattr(sharded, "key", None) for part in state.values() for sharded in part.values()
    }
    saved = dist_checkpointing.load_tensors_metadata(str(directory)).keys()
    unused = [k for k in saved if k not in requested]
    if unused and all(PREDICTOR_KEY_FRAGMENT in k for k in unused):
        warnings.warn(
            f"checkpoint {directory}: predictor weights ignored (this replay mode has no "
            f"predictor): {sorted(unused)}",
            stacklevel=4,
        )
        return unused
    return []


def _drop_missing_predictor_keys(state: dict, directory: str | Path) -> list[str]:
    saved = set(dist_checkpointing.load_tensors_metadata(str(directory)).keys())
    dropped = []
    for part in state.values():
        for name in list(part):
            sharded = part[name]
            key = getattr(sharded, "key", None)
            if PREDICTOR_KEY_FRAGMENT in name and key is not None and key not in saved:
                dropped.append(key)
                del part[name]
    return dropped


def export_state_dict(
    modules: Sequence[torch.nn.Module], include_predictor: bool = False
) -> dict[str, torch.Tensor]:
    """Plain state dict for a rollout engine or Hugging Face conversion; the predictor is
    excluded unless the engine applies it (``pr2_r3``)."""
    out: dict[str, torch.Tensor] = {}
    for i, module in enumerate(modules):
        prefix = "" if len(modules) == 1 else f"chunk{i}."
        for name, tensor in module.state_dict().items():
            if not include_predictor and PREDICTOR_KEY_FRAGMENT in name:
                continue
            if torch.is_tensor(tensor):
                out[prefix + name] = tensor
    return out


def predictor_named_parameters(modules: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": p
        for i, module in enumerate(modules)
        for name, p in module.named_parameters()
        if getattr(p, PREDICTOR_ATTR, False)
    }
