"""Routing replay on a Megatron-Bridge model: a Qwen3-MoE provider whose
``transformer_layer_spec`` goes through ``with_replay_router``.

A lab that builds its model with Megatron-Bridge swaps one field of the provider; this script
checks that this is all it takes (issue 15, point 4a)::

    provider = AutoBridge.from_hf_pretrained(path).to_megatron_provider(load_weights=True)
    use_replay_router(provider, RouterReplayConfig(mode="r3"))  # megatron_pr2.integrations

Runs in the bridge's own venv (megatron-bridge 0.6.2 needs megatron-core 0.19.2 and
transformers 5.12; the bridge is imported as ``tools/convert_bridge_check.py`` imports it),
see ``.ci/run``::

    PYTHONPATH=. .venv-bridge/bin/python tools/bridge_replay_check.py

What it checks, on a tiny random Qwen3-MoE (4 MoE layers, 8 experts, top-2), 2 microbatches:

1. every router of the bridge-built model is our ``ReplayTopKRouter`` and its
   ``router.router_replay`` is a registered megatron ``RouterReplay`` (our compat object);
2. routes recorded on it (``ReplaySession.recording``) are replayed exactly after the router
   weights moved (each forward's routing map equals the recorded top-k, and differs from the
   live routing of the moved weights for some tokens);
3. that replayed training pass, under full activation recompute on the bridge model, gives the
   same losses and gradients as the project's own GPT (built from ``pr2 convert``'s model
   description, the bridge's weights copied in, no recompute) replaying the same routes;
4. megatron's native calls (``RouterReplay.set_replay_data`` + ``REPLAY_FORWARD`` per
   microbatch) on the bridge model give the same gradients as the session;
5. negative control: live routing of the moved weights gives other gradients.

Exit status 0: all hold; 1: a failure (named); 3: the bridge cannot be imported (SKIPPED).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEQ, MICRO_BATCH, NUM_MICROBATCHES = 16, 2, 2
#: Gradients of two builds of one model replaying one route: equal up to summation order.
GRAD_TOL = 1e-6
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def replay_routers(model: Any) -> list[Any]:
    from megatron_pr2.patch.router import ReplayTopKRouter

    found = [m for m in model.modules() if isinstance(m, ReplayTopKRouter)]
    return sorted(found, key=lambda router: router.layer_number)


@contextlib.contextmanager
def routing_maps(model: Any) -> Iterator[dict[int, list[Any]]]:
    """Each router's routing map per original forward (recomputes left out), by layer."""
    from megatron_pr2.replay.state import in_backward_recompute

    maps: dict[int, list[Any]] = {r.layer_number: [] for r in replay_routers(model)}

    def hook(router, _inputs, output):
        if not in_backward_recompute():
            maps[router.layer_number].append(output[1].detach().clone())

    handles = [r.register_forward_hook(hook) for r in replay_routers(model)]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def one_hot(indices: Any, num_experts: int) -> Any:
    import torch

    return torch.zeros(indices.shape[0], num_experts, dtype=torch.bool).scatter(1, indices, True)


def grads(model: Any) -> dict[str, Any]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"gradients of different parameters: {sorted(set(a) ^ set(b))}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def drift(model: Any) -> None:
    """Move every router weight the same way in any build (seeded by layer), as an update
    step would: replay, not the weights, must then decide the routes."""
    import torch

    with torch.no_grad():
        for router in replay_routers(model):
            g = torch.Generator().manual_seed(100 + router.layer_number)
            weight = router.weight
            weight.add_(torch.randn(weight.shape, generator=g) * weight.std())


def native_replay_pass(model: Any, batches: list[Any], routes: dict[int, list[Any]]) -> list:
    """A training pass driven by megatron's native calls only, armed per microbatch."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2.models.gpt import lm_forward_backward, lm_forward_step

    layers = sorted(routes)
    count = iter(range(len(batches)))

    def step(data_iterator, chunk):
        mb = next(count)
        RouterReplay.set_replay_data([routes[layer][mb] for layer in layers])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        return lm_forward_step(data_iterator, chunk)

    try:
        return lm_forward_backward([model], batches, forward_step_func=step)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()


def reference_model(hf_dir: Path, work: Path, weights_from: Any) -> Any:
    """The project's own GPT for the same HF model (``pr2 convert``'s description, our
    routers), with the bridge model's weights copied in by name and the bridge's load-balancing
    loss (its Qwen3-MoE default: aux_loss, 1e-3; ``pr2 convert`` leaves it off), whose gradient
    reaches every parameter."""
    import torch

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.convert import hf_to_mcore, load_converted_model_description
    from megatron_pr2.convert.model import build_model_chunks_from_description

    hf_to_mcore(hf_dir, work / "ours", show_progress=False)
    description = load_converted_model_description(work / "ours")
    bridge_config = weights_from.config
    (model,) = build_model_chunks_from_description(
        description,
        RouterReplayConfig(mode="r3"),
        moe_router_load_balancing_type=bridge_config.moe_router_load_balancing_type,
        moe_aux_loss_coeff=bridge_config.moe_aux_loss_coeff,
    )
    theirs = dict(weights_from.named_parameters())
    ours = dict(model.named_parameters())
    if ours.keys() != theirs.keys():
        raise AssertionError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))}")
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
    return model


def run_checks(provider: Any, hf_dir: Path, work: Path) -> list[str]:
    """The checks of the module doc; returns the failures (empty: all hold)."""
    import torch
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_pr2.models.gpt import LMBatch, lm_forward_backward
    from megatron_pr2.patch.native import CompatRouterReplay
    from megatron_pr2.replay.session import ReplaySession

    problems: list[str] = []
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    routers = replay_routers(model)
    num_experts = int(provider.num_moe_experts)
    layers = [r.layer_number for r in routers]
    if len(routers) != provider.num_layers:
        problems.append(f"{len(routers)} replay routers for {provider.num_layers} MoE layers")
    registered = list(RouterReplay.global_router_replay_instances)
    if not all(type(r.router_replay) is CompatRouterReplay for r in routers) or registered != [
        r.router_replay for r in routers
    ]:
        problems.append("router.router_replay is not our registered megatron RouterReplay")

    g = torch.Generator().manual_seed(0)
    batches = [
        LMBatch.random(MICRO_BATCH, SEQ, int(provider.vocab_size), g)
        for _ in range(NUM_MICROBATCHES)
    ]
    session = ReplaySession([model])
    with torch.no_grad(), session.recording() as record:
        lm_forward_backward([model], batches, forward_only=True)
    routes = record.routes
    drift(model)

    with routing_maps(model) as live_maps:  # the moved weights' own routes
        with torch.no_grad():
            lm_forward_backward([model], batches, forward_only=True)
    with routing_maps(model) as maps:
        with session.replaying(routes):
            bridge_losses = lm_forward_backward([model], batches)
    bridge_grads = grads(model)
    moved = 0
    for layer in layers:
        for mb in range(NUM_MICROBATCHES):
            expected = one_hot(routes[layer][mb], num_experts)
            if not torch.equal(maps[layer][mb], expected):
                problems.append(f"layer {layer}, microbatch {mb}: replayed routes != recorded")
            moved += int((live_maps[layer][mb] != expected).any(dim=1).sum())
    if moved == 0:
        problems.append("the weight drift moved no route: the replay check would prove nothing")

    model.zero_grad(set_to_none=True)
    native_losses = native_replay_pass(model, batches, routes)
    native_diff = max_diff(bridge_grads, grads(model))
    if native_diff > GRAD_TOL or any(
        not torch.equal(a["lm_loss"], b["lm_loss"]) for a, b in zip(native_losses, bridge_losses)
    ):
        problems.append(f"native RouterReplay calls vs session: max |grad diff| {native_diff}")

    model.zero_grad(set_to_none=True)
    lm_forward_backward([model], batches)  # live: the negative control
    live_diff = max_diff(bridge_grads, grads(model))
    if live_diff <= 1e-4:
        problems.append(f"live routing gives the replayed gradients ({live_diff}): no signal")

    reference = reference_model(hf_dir, work, model)
    ref_session = ReplaySession([reference])
    with ref_session.replaying(routes):
        ref_losses = lm_forward_backward([reference], batches)
    ref_diff = max_diff(bridge_grads, grads(reference))
    loss_diff = max(
        abs(float(a["lm_loss"]) - float(b["lm_loss"])) for a, b in zip(bridge_losses, ref_losses)
    )
    if ref_diff > GRAD_TOL or loss_diff > GRAD_TOL:
        problems.append(
            f"bridge model (recompute) vs pr2's own GPT replaying the same routes: max |grad "
            f"diff| {ref_diff}, max |loss diff| {loss_diff}"
        )
    print(
        f"bridge vs own GPT: |grad diff| {ref_diff:.3g}, |loss diff| {loss_diff:.3g}; native vs "
        f"session {native_diff:.3g}; live vs replay {live_diff:.3g}; {moved} token-layer routes "
        "moved by the drift and restored by replay"
    )
    return problems


def main() -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from convert_bridge_check import cpu_provider, import_bridge

    from tests.support.dist import free_port, init_process

    init_process(0, 1, free_port())  # CPU shim (triton stand-in for 0.19) + gloo world 1
    try:
        AutoBridge, local_layer_spec = import_bridge()
    except Exception as exc:  # the check cannot run here: say so loudly, distinctly
        print(f"SKIPPED: cannot import megatron.bridge: {type(exc).__name__}: {exc}")
        return 3

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.integrations.megatron_bridge import use_replay_router
    from tests.support.hf_models import build_hf_model, save

    work = Path(tempfile.mkdtemp(prefix="bridge_replay_"))
    try:
        save(build_hf_model("qwen3_moe", seed=2), work / "hf")
        provider = cpu_provider(work / "hf", AutoBridge, local_layer_spec, **RECOMPUTE)
        use_replay_router(provider, RouterReplayConfig(mode="r3"), base_spec=local_layer_spec)
        problems = run_checks(provider, work / "hf", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        print("FAILED: routing replay on a Megatron-Bridge model:\n  " + "\n  ".join(problems))
        return 1
    print(
        "OK: Megatron-Bridge Qwen3-MoE provider with with_replay_router: recorded routes "
        "replayed exactly; gradients equal pr2's own GPT and megatron's native replay calls"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
