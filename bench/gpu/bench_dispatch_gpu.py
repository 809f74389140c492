"""GPU benchmark: replay-aware token dispatch on a Qwen3-30B-A3B-shaped MoE layer.

The GPU counterpart of ``bench/bench_dispatch.py``. One MoE layer (hidden 2048, 128 experts,
top-8, moe_ffn_hidden_size 768, bf16, fp32 router, ``alltoall`` dispatcher; the layer builders
of ``bench_replay_gpu.py``) with a replay router and a planned-dispatch ``ReplayMoELayer``,
replaying fixed routes in every step. Two variants of the same layer:

* ``megatron``: no plan, megatron's own ``preprocess`` (counts from the routing map, count
  all-gather over TP x EP when EP*TP > 1, device-to-host copy, event synchronisation);
* ``planned``: ``DispatchPlanner.build`` once (the one host read of the batch), then every step
  takes the counts and split sizes from the host plan.

Per variant: forward + backward time (CUDA events, medians), host syncs per step counted by
``torch.cuda.set_sync_debug_mode("warn")`` (all syncs in the step, e.g. also megatron's unfused
``permute``, which uses ``masked_select``) and the dispatcher's own synchronisations (its
``_maybe_dtoh_and_synchronize`` reaching its sync point). Target: 0 dispatcher syncs under the
plan, against megatron's 1 per layer call.

Command, from the repository root on a machine with GPUs (EP = number of processes)::

    torchrun --nproc-per-node 1 bench/gpu/bench_dispatch_gpu.py
    torchrun --nproc-per-node 8 bench/gpu/bench_dispatch_gpu.py     # EP8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VARIANTS = ("megatron", "planned")


def fail(message: str) -> None:
    print(f"bench_dispatch_gpu: {message}", file=sys.stderr)
    sys.exit(2)


def init(ep: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def build(backend: str, permute_fusion: bool, ep: int):
    from bench.gpu.bench_replay_gpu import build_layer, layer_config, moe_spec
    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.patch import apply_compat_fixes
    from megatron_pr2.patch.spec import with_planned_dispatch, with_replay_router
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession

    apply_compat_fixes()
    config = layer_config(
        backend, permute_fusion and backend == "te", expert_model_parallel_size=ep
    )
    spec = with_replay_router(moe_spec(backend), RouterReplayConfig(mode="r3"))
    layer = build_layer(with_planned_dispatch(spec), config)
    return layer, ReplaySession(layer), DispatchPlanner(layer)


def dispatcher_sync_counter() -> tuple[Counter[str], Callable[[], None]]:
    """Count the dispatcher's own synchronisations (restore with the returned callable)."""
    from megatron.core.transformer.moe import token_dispatcher as td

    counts: Counter[str] = Counter()
    original = td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize

    def sync(self, point, tokens_per_expert=None):
        if point == self.cuda_sync_point:
            counts["dispatcher"] += 1
        return original(self, point, tokens_per_expert)

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = sync

    def restore() -> None:
        td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = original

    return counts, restore


def count_syncs(step: Callable[[], None]) -> tuple[int, int]:
    """(all host syncs in one step per torch's sync debug mode, the dispatcher's own)."""
    counts, restore = dispatcher_sync_counter()
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        restore()
    return sum("synchroniz" in str(w.message) for w in caught), counts["dispatcher"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--backend", choices=("auto", "te", "local"), default="auto")
    parser.add_argument("--no-permute-fusion", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA GPU visible; this benchmark needs one")
    from bench.gpu.bench_replay_gpu import NUM_EXPERTS, TOPK, te_available

    backend = args.backend
    if backend == "auto":
        backend = "te" if te_available() else "local"
    ep = int(os.environ.get("WORLD_SIZE", "1"))
    init(ep)
    layer, session, planner = build(backend, not args.no_permute_fusion, ep)
    rank = torch.distributed.get_rank()
    gen = torch.Generator(device="cuda").manual_seed(rank)
    hidden = layer.config.hidden_size
    x = torch.randn(
        args.tokens, 1, hidden, device="cuda", dtype=torch.bfloat16, generator=gen
    ).requires_grad_()
    grad = torch.randn_like(x)
    scores = torch.rand(args.tokens, NUM_EXPERTS, device="cuda", generator=gen)
    routes = {layer.layer_number: [scores.argsort(dim=1)[:, :TOPK].contiguous()]}
    prepared = session.prepare(routes)
    start = time.perf_counter()
    plan = planner.build(prepared)
    build_ms = (time.perf_counter() - start) * 1e3

    def step(planned: bool) -> Callable[[], None]:
        def run() -> None:
            if planned:
                with planner.planning(plan), session.replaying(prepared):
                    out, _ = layer(x)
            else:
                with session.replaying(prepared):
                    out, _ = layer(x)
            out.backward(grad)
            x.grad = None

        return run

    steps = {v: step(v == "planned") for v in VARIANTS}
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = VARIANTS[rep % 2 :] + VARIANTS[: rep % 2]
        for name in order:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            steps[name]()
            end.record()
            end.synchronize()
            times[name].append(begin.elapsed_time(end))
    syncs = {v: count_syncs(steps[v]) for v in VARIANTS}
    stats = planner.take_stats()
    if rank == 0:
        print(f"### {torch.cuda.get_device_name()}, EP{ep}, backend {backend}")
        print(
            f"* {args.tokens} tokens/rank, {args.warmup} warm-up + {args.reps} steps, plan "
            f"build {build_ms:.2f} ms ({plan.nbytes} bytes), dispatch stats {stats}"
        )
        print()
        print("| variant | fwd+bwd ms (median) | host syncs / step | dispatcher syncs / step |")
        print("|---|---|---|---|")
        for name in VARIANTS:
            total, own = syncs[name]
            print(f"| {name} | {statistics.median(times[name]):.3f} | {total} | {own} |")
        ref, new = (statistics.median(times[v]) for v in VARIANTS)
        if ref > 0:
            print(f"\nplanned / megatron: {new / ref:.3f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
