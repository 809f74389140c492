"""Shared fixtures: a world-1 gloo group with megatron state for in-process tests."""

from __future__ import annotations

import pytest
import torch

import tests  # noqa: F401  (installs the CPU shim before test modules import megatron.core)


@pytest.fixture(scope="session")
def megatron_world1():
    """World-1 megatron-core on CPU (shim + gloo), initialised once per test session."""
    from tests.support.dist import init_single_process

    init_single_process()
    yield


@pytest.fixture
def world1(megatron_world1):
    """Per-test reset of RNG and megatron's global MoE trackers."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
    )
    from megatron.core.transformer.moe.router_replay import RouterReplay

    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    clear_aux_losses_tracker()
    # A backward outside megatron's schedule leaves a 0-d scale that the schedule's later
    # set_loss_scale(shape [1]) cannot copy into: reset the class-level tensor per test.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    RouterReplay.clear_global_router_replay_instances()
    yield
    RouterReplay.clear_global_router_replay_instances()


@pytest.fixture
def run_dist():
    """``run_dist(fn, world_size, *args)``: run ``fn(rank, world_size, *args)`` on that many
    gloo processes (CPU shim installed in each); the test fails with every failing rank's
    traceback. Run layout matrices inside one call to amortise the spawn."""
    from tests.support.dist import run_dist as launch

    return launch
