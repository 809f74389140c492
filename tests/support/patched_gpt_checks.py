"""Replay checks against a megatron-core copy that carries ``patches/`` (not collected by default).

``tests/unit/test_patches.py`` runs this file in a subprocess with the patched copy first on
``sys.path``. Models here are built from megatron's *stock* decoder spec, never through
``with_replay_router``: the replay routers must come from the patched ``MoELayer`` hook alone.
Run directly without the patched copy, every check skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, lm_forward_backward, moe_transformer_config
from megatron_pr2.patch.hooks import ENV_VAR, active_setting, router_hook
from megatron_pr2.patch.router import ReplayTopKRouter
from megatron_pr2.replay.session import ReplaySession
from tests.support import replay_harness as h
from tests.support.patched_core import PATCHED_ENV

PATCHED = os.environ.get(PATCHED_ENV)
pytestmark = pytest.mark.skipif(
    not PATCHED, reason=f"run by tests/unit/test_patches.py with {PATCHED_ENV} set"
)


def _routers(chunks: list) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m.router for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]


def build_stock(recompute: str = "off", seed: int = 5) -> h.Built:
    """The harness's tiny GPT, built from megatron's stock spec (no spec rewrite)."""
    torch.manual_seed(seed)
    config = moe_transformer_config(h.SHAPE, **h.RECOMPUTE[recompute])
    chunks = build_model_chunks(config, h.SHAPE.vocab_size, h.SEQ, replay_config=None)
    replays = any(isinstance(r, ReplayTopKRouter) for r in _routers(chunks))
    return h.Built(chunks, ReplaySession(chunks) if replays else None)


def build_hooked(recompute: str = "off", mode: str = "r2", seed: int = 5) -> h.Built:
    with router_hook(RouterReplayConfig(mode=mode, metrics_token_stride=1)):
        return build_stock(recompute, seed)


def test_megatron_core_is_the_patched_copy():
    import megatron.core
    from megatron.core.transformer.moe import moe_layer

    assert Path(megatron.core.__file__).resolve().is_relative_to(Path(PATCHED).resolve())
    assert hasattr(moe_layer, "_build_router"), "the router hook is not in the imported MoELayer"


def test_hook_off_leaves_stock_routers(world1):
    from megatron.core.transformer.moe.router import TopKRouter

    assert active_setting() is None
    built = build_stock()
    routers = _routers(built.chunks)
    assert len(routers) == h.SHAPE.num_layers
    assert all(type(r) is TopKRouter for r in routers)


def test_hook_on_builds_replay_routers_from_the_stock_spec(world1):
    built = build_hooked()
    routers = _routers(built.chunks)
    assert len(routers) == h.SHAPE.num_layers
    assert all(type(r) is ReplayTopKRouter for r in routers)
    assert all(r.replay_config.mode.value == "r2" for r in routers)
    assert active_setting() is None  # router_hook is scoped to the build
    assert built.session.layers == [1, 2, 3, 4]


def test_environment_variable_enables_the_hook(world1, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "pr2")
    routers = _routers(build_stock().chunks)
    assert all(type(r) is ReplayTopKRouter for r in routers)
    assert all(r.evolution_predictor is not None for r in routers)


def test_r2_record_then_replay_reproduces_output_and_gradients_exactly(world1):
    built = build_hooked()
    batches = h.make_batches(3)
    live_losses = lm_forward_backward(built.chunks, batches)
    live_grads = h.grads(built.chunks)
    h.zero_grads(built.chunks)

    with torch.no_grad(), built.session.recording() as record:
        lm_forward_backward(built.chunks, batches, forward_only=True)
    assert sorted(record.routes) == [1, 2, 3, 4] and record.num_microbatches == 3

    replay_losses = h.train_pass_ours(built, batches, record.routes)
    for live, replayed in zip(live_losses, replay_losses):
        assert torch.equal(live["lm_loss"], replayed["lm_loss"])
    replay_grads = h.grads(built.chunks)
    assert live_grads.keys() == replay_grads.keys()
    for name in live_grads:
        assert torch.equal(live_grads[name], replay_grads[name]), name
    assert built.session.metrics()["router_replay/zero_deviation_ratio"] == 1.0


def test_replayed_routes_take_effect(world1):
    built = build_hooked()
    batches = h.make_batches(2)
    live = lm_forward_backward(built.chunks, batches, forward_only=True)
    forced = h.train_pass_ours(built, batches, h.random_routes(2))
    assert not torch.equal(live[0]["lm_loss"], forced[0]["lm_loss"])


def test_full_recompute_replays_the_routes_of_the_original_forward(world1):
    batches = h.make_batches(4)
    routes = h.random_routes(4)
    results = []
    for recompute in ("off", "full"):
        built = build_hooked(recompute)
        h.train_pass_ours(built, batches, routes)
        results.append(h.grads(built.chunks))
    assert h.max_grad_diff(*results) <= 1e-6
