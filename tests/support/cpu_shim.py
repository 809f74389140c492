"""Test-only shim that lets real megatron-core run on a CPU-only machine with gloo.

Never imported by the ``megatron_pr2`` package. Each patch below answers one entry of the
error table in the project's CPU notes; each has a canary in ``tests/unit/test_cpu_shim.py``
that fails loudly when an upstream change makes it miss its target.

Call :func:`install` once per process *before* ``import megatron.core`` is needed by a model
(it imports megatron itself), then build models as usual.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: TorchFunctionMode | None = None

#: Names of the patches applied, for the canary tests.
APPLIED: dict[str, bool] = {}


# --------------------------------------------------------------------------------------------
# 0.19: `megatron.core` imports triton unguarded through moe/ops/paged_stash.py (CPU notes §1.3).
# --------------------------------------------------------------------------------------------
def _stand_in_paged_stash_ops() -> None:
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    try:
        import triton  # noqa: F401

        return  # the real kernels import fine
    except ImportError:
        pass

    def _unavailable(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("paged stash kernels need triton and a GPU")

    module = types.ModuleType(name)
    module.GLOBAL_BLOCK_SIZE = 1024
    module.paged_stash_copy_kernel = _unavailable
    module.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = module
    APPLIED["paged_stash_stand_in"] = True


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins (errors #1, #2, #3)
# --------------------------------------------------------------------------------------------
class _NoOpStream:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def wait_stream(self, *_a: Any) -> None:
        pass

    def wait_event(self, *_a: Any) -> None:
        pass

    def record_event(self, *_a: Any) -> _NoOpEvent:
        return _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoOpEvent:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def record(self, *_a: Any) -> None:
        pass

    def wait(self, *_a: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, _other: Any) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda *_a, **_k: _NoOpStream()
    cuda.default_stream = lambda *_a, **_k: _NoOpStream()
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    cuda.synchronize = lambda *_a, **_k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *_a, **_k: None
    cuda.nvtx.range_push = lambda *_a, **_k: None
    cuda.nvtx.range_pop = lambda *_a, **_k: None
    APPLIED["torch_cuda"] = True


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    assert hasattr(mrandom, "_get_cuda_rng_state") and hasattr(mrandom, "_set_cuda_rng_state")
    mrandom._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    APPLIED["megatron_rng"] = True


# --------------------------------------------------------------------------------------------
# megatron helpers (errors #4, #5, #6, #8)
# --------------------------------------------------------------------------------------------
def _patch_te_general_gemm() -> None:
    # Not CPU-specific (0.16.x without TE on any device): the package's own fix, applied early.
    from megatron_pr2.patch.compat import bind_missing_te_general_gemm

    if bind_missing_te_general_gemm():
        APPLIED["te_general_gemm"] = True


def _patch_split_sizes_to_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    APPLIED["split_sizes_to_numpy"] = True


def _patch_uneven_all_gather() -> None:
    """gloo has no uneven all_gather; express it as an uneven all_to_all_single."""
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        world = group.size()
        send = input_.contiguous().repeat(world, *([1] * (input_.dim() - 1)))
        output = input_.new_empty((sum(output_split_sizes), *input_.shape[1:]))
        torch.distributed.all_to_all_single(
            output,
            send,
            output_split_sizes=list(output_split_sizes),
            input_split_sizes=[input_.shape[0]] * world,
            group=group,
        )
        return output

    mappings._gather_along_first_dim = _gather_along_first_dim
    APPLIED["uneven_all_gather"] = True


def _patch_torch_norm_sequence_parallel() -> None:
    """Allow SP with the torch norm; tag its params like TE/apex do for the TP grad all-reduce."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original_new(cls, config, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)
    APPLIED["torch_norm_sequence_parallel"] = True


# --------------------------------------------------------------------------------------------
# device="cuda" in megatron code (errors #7, #9)
# --------------------------------------------------------------------------------------------
def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` keyword arguments, ``.cuda()`` and ``.to("cuda")`` to CPU."""

    _CUDA_TYPE_NAMES: ClassVar[dict[torch.dtype, str]] = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = self._CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:  # clip_grads asserts the grads are torch.cuda.FloatTensor
                return name
        return func(*args, **kwargs)


def _patch_recompute_backward_mode() -> None:
    """Torch-function modes are thread-local state that autograd does not carry into a custom
    Function's backward, so megatron's activation recompute would run without the mode."""
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("CheckpointFunction", "CheckpointWithoutOutputFunction"):
        function = getattr(mrandom, name)
        original = function.backward

        def backward(ctx, *args, _original=original):
            if _MODE is None or _MODE in torch.overrides._get_current_function_mode_stack():
                return _original(ctx, *args)
            with CudaToCpuMode():
                return _original(ctx, *args)

        function.backward = staticmethod(backward)
    APPLIED["recompute_backward_mode"] = True


def install() -> None:
    """Apply every patch once in this process; idempotent."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return
    torch._dynamo.config.disable = True
    _stand_in_paged_stash_ops()
    _patch_torch_cuda()
    import megatron.core  # noqa: F401  (after the stand-in)

    _patch_megatron_rng()
    _patch_te_general_gemm()
    _patch_split_sizes_to_numpy()
    _patch_uneven_all_gather()
    _patch_torch_norm_sequence_parallel()
    _patch_recompute_backward_mode()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # thread-local; pushed once for the whole process
    APPLIED["cuda_to_cpu_mode"] = True
    _INSTALLED = True
