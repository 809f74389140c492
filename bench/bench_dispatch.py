"""Replay-aware token dispatch on CPU: megatron's all-to-all dispatcher with and without a plan.

Run from the repository root (the default settings take a few minutes on 2 idle cores)::

    .venv/bin/python bench/bench_dispatch.py                 # world 1
    .venv/bin/python bench/bench_dispatch.py --world 2       # EP2 on gloo (spawns 2 processes)
    .venv/bin/python bench/bench_dispatch.py --reps 3 --gpt-reps 2 --no-write   # smoke run
    .venv/bin/python bench/bench_dispatch.py --dispatcher allgather  # the all-gather dispatcher

Both variants run the same model, the same replayed routes and megatron's own permute /
all-to-all / expert / combine code; they differ only in where ``preprocess`` gets its counts:
``megatron`` (no plan: ``routing_map.sum``, count all-gather over TP x EP, device-to-host copy,
synchronisation) or ``planned`` (``DispatchPlanner.build`` once, then host lookups). Timed
round-robin, start rotated, medians reported, after a warm-up:

1. ``preprocess``: the dispatcher's ``dispatch_preprocess`` alone on one MoE layer (the part the
   plan replaces), per call;
2. ``layer``: one MoE layer forward + backward inside a replayed pass;
3. ``gpt step``: one tiny-GPT step (``lm_forward_backward``, 4 microbatches).

With the all-to-all dispatcher the GPT step also runs ``padded``: the plan's zero-drop capacity
through megatron's drop-and-pad path (fixed shapes, equal splits). With ``--dispatcher
allgather`` the plan replaces the dispatcher's blocking ``.cpu()`` of the tokens per expert.

Also printed: the per-step count all-gathers, host synchronisations and host reads of the
dispatchers (counted on their own calls) and the plan's build time and size. On CPU the "host sync" costs
nothing (there is no device), so the time saved here is the count all-gather and the Python
work; bench/gpu/bench_dispatch_gpu.py measures the synchronisations on a GPU.
Results go to stdout and to ``bench/RESULTS.md``, section "## Replay-aware dispatch (issue 17)".
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTION_TITLE = "## Replay-aware dispatch (issue 17)"
VARIANTS = ("megatron", "planned")


def timed(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median milliseconds per variant, round-robin with a rotating start."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def moe_layer(args: argparse.Namespace):
    """One planned-dispatch MoE layer with a replay router, and its session and planner."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import TinyMoEShape, moe_transformer_config
    from megatron_pr2.patch.spec import with_planned_dispatch, with_replay_router
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession

    shape = TinyMoEShape(
        num_layers=1,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
    )
    config = moe_transformer_config(shape, moe_token_dispatcher_type=args.dispatcher)
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts, moe_grouped_gemm=False)
    spec = with_planned_dispatch(with_replay_router(spec, RouterReplayConfig(mode="r2")))
    if isinstance(spec, functools.partial):  # megatron-core 0.19 MoE builders
        layer = spec(config=config, layer_number=1)
    else:  # 0.16 ModuleSpec
        layer = build_module(spec, config=config, layer_number=1)
    layer.set_layer_number(1)
    return layer, ReplaySession(layer), DispatchPlanner(layer)


def bench_layer(args: argparse.Namespace, rank: int) -> dict[str, float]:
    from megatron_pr2.replay.state import RouteAction
    from tests.support.dispatch_harness import count_dispatch_syncs

    layer, session, planner = moe_layer(args)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen, requires_grad=True)
    grad = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    routes = {1: [torch.rand(args.tokens, args.experts, generator=gen).argsort(1)[:, : args.topk]]}
    start = time.perf_counter()
    plan = planner.build(routes)
    build_ms = (time.perf_counter() - start) * 1e3

    def layer_step(planned: bool) -> Callable[[], None]:
        def step() -> None:
            if planned:
                with planner.planning(plan), session.replaying(routes):
                    out, _ = layer(x)
            else:
                with session.replaying(routes):
                    out, _ = layer(x)
            out.backward(grad)

        return step

    state = session.state(1)
    state.set_action(RouteAction.REPLAY, plan=routes[1])  # the router state a replayed pass has
    with torch.no_grad():
        probs, routing_map = layer.route(x)
    state.reset()
    dispatcher = layer.token_dispatcher
    flat = x.detach().view(-1, args.hidden)

    def preprocess_step(planned: bool) -> Callable[[], None]:
        def step() -> None:
            if planned:  # a fresh slot per call: each call is microbatch 0 of a pass
                with planner.planning(plan):
                    dispatcher.dispatch_preprocess(flat, routing_map, probs)
            else:
                dispatcher.dispatch_preprocess(flat, routing_map, probs)

        return step

    state.set_action(RouteAction.REPLAY, plan=routes[1])
    with torch.no_grad():
        pre = timed({v: preprocess_step(v == "planned") for v in VARIANTS}, args.warmup, args.reps)
    state.reset()
    lay = timed({v: layer_step(v == "planned") for v in VARIANTS}, args.warmup, args.reps)
    with count_dispatch_syncs() as megatron_counts:
        layer_step(False)()
    with count_dispatch_syncs() as planned_counts:
        layer_step(True)()
    return {
        **{f"preprocess_{v}": pre[v] for v in VARIANTS},
        **{f"layer_{v}": lay[v] for v in VARIANTS},
        "plan_build_ms": build_ms,
        "plan_bytes": plan.nbytes,
        "megatron_syncs": megatron_counts["host_sync"] + megatron_counts["host_read"],
        "megatron_count_gathers": megatron_counts["count_allgather"],
        "planned_syncs": planned_counts["host_sync"] + planned_counts["host_read"],
        "planned_count_gathers": planned_counts["count_allgather"],
    }


def bench_gpt(args: argparse.Namespace) -> dict[str, float]:
    from megatron_pr2.replay.dispatch_plan import DispatchPlanner
    from megatron_pr2.replay.session import ReplaySession
    from tests.support import dispatch_harness as d

    chunks = d.build_planned("r3", moe_token_dispatcher_type=args.dispatcher)
    session = ReplaySession(chunks)
    planner = DispatchPlanner(chunks)
    batches = d.h.make_batches(4)
    routes = d.h.random_routes(len(batches))
    plan = planner.build(routes)
    variants = VARIANTS + (("padded",) if args.dispatcher == "alltoall" else ())

    def step(variant: str) -> Callable[[], None]:
        def run() -> None:
            if variant == "megatron":
                d.replay_pass(chunks, session, batches, routes)
            else:
                d.replay_pass(chunks, session, batches, routes, planner, plan, variant == "padded")

        return run

    times = timed({v: step(v) for v in variants}, args.gpt_warmup, args.gpt_reps)
    ref = d.replay_pass(chunks, session, batches, routes)
    out = {}
    for variant in variants[1:]:
        new = d.replay_pass(chunks, session, batches, routes, planner, plan, variant == "padded")
        assert d.max_diff(ref[0], new[0]) <= 1e-6, f"{variant} dispatch changed the losses"
        out[f"gpt_{variant}_syncs"] = new[2]["host_sync"] + new[2]["host_read"]
        out[f"gpt_{variant}_count_gathers"] = new[2]["count_allgather"]
    return {
        **{f"gpt_{v}": times[v] for v in variants},
        "gpt_megatron_syncs": ref[2]["host_sync"] + ref[2]["host_read"],
        "gpt_megatron_count_gathers": ref[2]["count_allgather"],
        **out,
    }


def report(results: dict[str, float], args: argparse.Namespace) -> str:
    def row(label: str, key: str, variant: str = "planned") -> str:
        ref, new = results[f"{key}_megatron"], results[f"{key}_{variant}"]
        return f"| {label} | {ref:.3f} | {new:.3f} | {new / ref:.3f} |"

    padded = (
        [row("GPT step, padded zero-drop plan (planned column)", "gpt", "padded")]
        if "gpt_padded" in results
        else []
    )
    return "\n".join(
        [
            f"### megatron-core {_core_version()}, world {args.world} (EP{args.world}), CPU, "
            f"{args.dispatcher} dispatcher",
            "",
            f"MoE layer: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-"
            f"{args.topk}, {args.tokens} tokens/rank; GPT: tiny 4-layer, 4 microbatches. "
            f"Medians of {args.reps} (layer) / {args.gpt_reps} (GPT) rounds.",
            "",
            "| measure (ms) | megatron | planned | planned / megatron |",
            "|---|---|---|---|",
            row(
                "dispatch preprocess, per layer call"
                + (
                    " (lookup only: .cpu() is in postprocess)"
                    if args.dispatcher != "alltoall"
                    else ""
                ),
                "preprocess",
            ),
            row("MoE layer forward + backward", "layer"),
            row("GPT step (4 microbatches)", "gpt"),
            *padded,
            "",
            f"Per GPT step: megatron {results['gpt_megatron_count_gathers']} count all-gathers, "
            f"{results['gpt_megatron_syncs']} host syncs/reads; planned "
            f"{results['gpt_planned_count_gathers']} and {results['gpt_planned_syncs']}. "
            f"Plan build (one layer, once per batch): {results['plan_build_ms']:.2f} ms, "
            f"{results['plan_bytes']} bytes.",
        ]
    )


def _core_version() -> str:
    from megatron_pr2.patch.version import megatron_core_version

    return str(megatron_core_version())


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    from tests.support.dist import Layout, init_layout

    init_layout(Layout(ep=world))
    results = {**bench_layer(args, rank), **bench_gpt(args)}
    if rank == 0:
        text = report(results, args)
        print(text)
        if not args.no_write:
            from bench.results import write_section

            title = SECTION_TITLE + ("" if args.dispatcher == "alltoall" else ", all-gather")
            write_section(title, f"{title}\n\n{text}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=1, choices=(1, 2, 4), help="EP size")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpt-reps", type=int, default=20)
    parser.add_argument("--gpt-warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.world == 1:
        from tests.support.dist import init_single_process

        init_single_process()
        worker(0, 1, args)
    else:
        from tests.support.dist import run_dist

        run_dist(worker, args.world, args)


if __name__ == "__main__":
    main()
