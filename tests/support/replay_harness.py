"""Shared pieces of the replay tests: tiny models, random routes, one training pass, and the
same pass driven by megatron-core's *native* RouterReplay (the negative control)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import (
    LMBatch,
    TinyMoEShape,
    build_model_chunks,
    lm_forward_backward,
    lm_forward_step,
    moe_transformer_config,
)
from megatron_pr2.replay.session import ReplaySession

SHAPE = TinyMoEShape(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_moe_experts=8)
SEQ, MICRO_BATCH = 16, 2

RECOMPUTE = {
    "off": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective_moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def make_batches(num_microbatches: int, seed: int = 0) -> list[LMBatch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        LMBatch.random(MICRO_BATCH, SEQ, SHAPE.vocab_size, generator)
        for _ in range(num_microbatches)
    ]


def local_tokens() -> int:
    """Tokens one router sees per microbatch: the SP slice when TP > 1."""
    from megatron.core import parallel_state

    return SEQ * MICRO_BATCH // parallel_state.get_tensor_model_parallel_world_size()


def random_routes(num_microbatches: int, seed: int = 99) -> dict[int, list[torch.Tensor]]:
    """Valid routes that differ from live routing, identical on every rank (by layer and mb).

    Under SP each TP rank takes its own contiguous token slice, as megatron's scatter does.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tokens = local_tokens()
    routes: dict[int, list[torch.Tensor]] = {}
    for layer in range(1, SHAPE.num_layers + 1):
        per_mb = []
        for mb in range(num_microbatches):
            g = torch.Generator().manual_seed(seed * 1000 + layer * 100 + mb)
            full = torch.rand(SEQ * MICRO_BATCH, SHAPE.num_moe_experts, generator=g).argsort(dim=1)
            full = full[:, : SHAPE.moe_router_topk]
            per_mb.append(full[tp_rank * tokens : (tp_rank + 1) * tokens].contiguous())
        routes[layer] = per_mb
    return routes


@dataclass
class Built:
    chunks: list[Any]
    session: ReplaySession | None


def build(variant: str, recompute: str = "off", seed: int = 5, **config_overrides: Any) -> Built:
    """``variant``: ``ours`` (ReplayTopKRouter), ``native`` (megatron's RouterReplay), ``none``."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(seed)
    overrides = dict(RECOMPUTE[recompute], **config_overrides)
    if variant == "native":
        overrides["moe_enable_routing_replay"] = True
    config = moe_transformer_config(SHAPE, **overrides)
    replay = RouterReplayConfig(mode="r3", metrics_token_stride=1) if variant == "ours" else None
    chunks = build_model_chunks(config, SHAPE.vocab_size, SEQ, replay_config=replay)
    return Built(chunks, ReplaySession(chunks) if variant == "ours" else None)


def grads(chunks: list[Any]) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": p.grad.detach().clone()
        for i, chunk in enumerate(chunks)
        for name, p in chunk.named_parameters()
        if p.grad is not None
    }


def zero_grads(chunks: list[Any]) -> None:
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)


def train_pass_ours(built: Built, batches: list[LMBatch], routes) -> list[dict]:
    with built.session.replaying(routes):
        return lm_forward_backward(built.chunks, batches)


# ------------------------------------------------------------------ native RouterReplay driver
class _IndexedBatches:
    """Iterator that remembers which microbatch it handed out last."""

    def __init__(self, batches: list[LMBatch]):
        self._it: Iterator[LMBatch] = iter(batches)
        self.index = -1

    def __iter__(self):
        return self

    def __next__(self) -> LMBatch:
        self.index += 1
        return next(self._it)


def train_pass_native(
    built: Built,
    batches: list[LMBatch],
    routes,
    switch_backward: bool = False,
    clear_after_forward: bool = False,
) -> list[dict]:
    """Arm megatron's native replay per microbatch inside the forward step (as NeMo-RL does),
    with the action left at REPLAY_FORWARD, which is what megatron-core documents.

    Works on any router whose ``router_replay`` is a megatron ``RouterReplay`` (megatron's own,
    or ours). ``switch_backward``: also switch every instance to REPLAY_BACKWARD when the
    gradient reaches a microbatch's output, i.e. before that microbatch's recompute (the
    caller-side switch megatron's native replay needs under pipelining; megatron has no hook).
    ``clear_after_forward``: clear every action right after each microbatch's forward (before
    its backward and, under 1F1B, before earlier microbatches' backwards).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    def to_backward(grad: torch.Tensor) -> torch.Tensor:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        return grad

    def forward_step(data_iterator: _IndexedBatches, model):
        microbatch = data_iterator.index + 1
        for module in model.modules():
            replay = getattr(module, "router_replay", None)
            if isinstance(replay, RouterReplay):
                replay.set_target_indices(routes[module.layer_number][microbatch])
                replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        output, loss_func = lm_forward_step(data_iterator, model)
        if clear_after_forward:
            RouterReplay.clear_global_router_replay_action()
        if switch_backward and output.requires_grad:
            output.register_hook(to_backward)
        return output, loss_func

    chunks = built.chunks
    iterators: Any = (
        [_IndexedBatches(batches) for _ in chunks] if len(chunks) > 1 else _IndexedBatches(batches)
    )
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
        )
    finally:
        RouterReplay.clear_global_indices()
        RouterReplay.clear_global_router_replay_action()


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def recompute_gap(
    variant: str, recompute: str, num_microbatches: int = 4, driver: str | None = None
) -> float:
    """Max |grad(recompute) - grad(no recompute)| over this rank's params, replay active.

    ``driver``: ``session`` (ReplaySession), ``native`` (megatron's RouterReplay API with
    REPLAY_FORWARD only), ``native_backward`` (plus the caller-side REPLAY_BACKWARD switch) or
    ``native_clear`` (the action cleared after each forward);
    default: ``session`` for ``ours``, ``native`` otherwise.
    """
    batches = make_batches(num_microbatches)
    routes = random_routes(num_microbatches)
    driver = driver or ("session" if variant == "ours" else "native")
    trains = {
        "session": train_pass_ours,
        "native": train_pass_native,
        "native_backward": lambda b, mbs, r: train_pass_native(b, mbs, r, switch_backward=True),
        "native_clear": lambda b, mbs, r: train_pass_native(b, mbs, r, clear_after_forward=True),
    }
    train = trains[driver]
    results = []
    for mode in ("off", recompute):
        built = build(variant, recompute=mode)
        train(built, batches, routes)
        results.append(grads(built.chunks))
    return max_grad_diff(*results)
