"""Canaries for the test-only CPU shim: each patch must still hit its megatron target."""

import torch

from tests.support import cpu_shim


def test_every_patch_was_applied():
    expected = {
        "torch_cuda",
        "megatron_rng",
        "split_sizes_to_numpy",
        "uneven_all_gather",
        "torch_norm_sequence_parallel",
        "cuda_to_cpu_mode",
        "recompute_backward_mode",
    }
    assert expected <= set(cpu_shim.APPLIED)


def test_megatron_rng_tracker_forks_cpu_state(world1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        inside = torch.rand(1)
    assert torch.rand(1).item() != inside.item()


def test_te_general_gemm_is_bound_on_0_16():
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "te_general_gemm")


def test_dispatcher_uses_the_patched_split_size_helper():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    out = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert out.tolist() == [1, 2] and not torch.is_tensor(out)


def test_uneven_gather_is_patched_in_mappings():
    from megatron.core.tensor_parallel import mappings

    assert mappings._gather_along_first_dim.__module__ == cpu_shim.__name__


def test_cuda_device_requests_land_on_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"


def test_torch_norm_accepts_sequence_parallel(world1):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_pr2.models.gpt import moe_transformer_config

    config = moe_transformer_config()
    config.sequence_parallel = True  # TP=1 here; megatron validates SP only at construction
    norm = WrappedTorchNorm(config, 8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
