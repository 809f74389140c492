"""Routing-replay overhead on one GPU: one Qwen3-30B-A3B-shaped MoE layer.

    torchrun --nproc-per-node 1 bench/gpu/bench_replay_gpu.py [--backend auto|te|local]

``--backend te`` builds the Transformer Engine spec (grouped-GEMM experts); ``local`` builds
megatron-core's local spec (``SequentialMLP`` experts: one GEMM pair per expert), for machines
without Transformer Engine; ``auto`` (default) takes TE when it imports. The router, which is all
that replay touches, is the same module in both.

Compares, in one process and interleaved round-robin (medians after warm-up):

* ``none``: ``MoELayer`` from ``get_moe_module_spec(use_te=True, moe_grouped_gemm=True)``;
* ``native``: the same spec with ``moe_enable_routing_replay=True``: ``RouterReplay.
  set_replay_data`` + ``REPLAY_FORWARD`` before the forward, ``clear_global_indices`` after;
* ``ours`` / ``ours_nometrics``: the spec through ``megatron_pr2.patch.with_replay_router``
  (``RouterReplayConfig(mode="r2")``, ``collect_metrics`` True / False) and
  ``ReplaySession.replaying(prepared routes)`` around the step (validated once up front).

Shape: hidden 2048, 128 experts, top-8, moe_ffn_hidden_size 768 (SwiGLU), bf16 params, fp32
router, TE grouped-GEMM experts, alltoall dispatcher, EP = TP = 1 (world size 1). All variants
share one set of weights and replay the routes the live router picks, so the expert work is
identical; the script checks that routing maps match.

Benchmarks per token count: the router alone (``router(hidden)``, backward of ``probs.sum()``)
and the whole MoE layer (forward + backward with a fixed output gradient). Each step starts on an
idle GPU (synchronize first) and is timed with CUDA events (and host wall time). One extra step
per variant runs under ``torch.cuda.set_sync_debug_mode("warn")`` to count host syncs. Prints a
markdown table with the GPU name; paste it into bench/RESULTS.md stating the card.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VARIANTS = ("none", "native", "ours", "ours_nometrics")
LABELS = {
    "none": "none (plain megatron)",
    "native": "native RouterReplay",
    "ours": "ours (collect_metrics=True)",
    "ours_nometrics": "ours (collect_metrics=False)",
}
TARGET_VS_NATIVE = 1.02
TARGET_VS_NONE = 1.05
EXPERTS = {"te": "TE grouped-GEMM experts", "local": "local SequentialMLP experts"}
# Qwen3-30B-A3B MoE layer
HIDDEN, NUM_EXPERTS, TOPK, MOE_FFN = 2048, 128, 8, 768


def fail(message: str) -> None:
    print(f"bench_replay_gpu: {message}", file=sys.stderr)
    sys.exit(2)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def check_environment(backend: str) -> str:
    """The backend to build (``te`` or ``local``); exits on a missing GPU or TE asked for."""
    if not torch.cuda.is_available():
        fail("no CUDA GPU visible (torch.cuda.is_available() is False); this benchmark needs one")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        fail("run with world size 1: torchrun --nproc-per-node 1 bench/gpu/bench_replay_gpu.py")
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        fail("Transformer Engine is not installed (pip install 'transformer-engine[pytorch]')")
    return backend


def init_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


# ------------------------------------------------------------------------------------ model
def layer_config(backend: str, permute_fusion: bool, **overrides):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=6144,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=MOE_FFN,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        moe_router_dtype="fp32",
        moe_grouped_gemm=backend == "te",  # local grouped GEMM needs the grouped_gemm package
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_fusion=False,  # the TE fused top-k bypasses every replay hook
        moe_permute_fusion=permute_fusion,
        gradient_accumulation_fusion=False,  # no DDP main_grad buffers here
        hidden_dropout=0.0,
        attention_dropout=0.0,
        sequence_parallel=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_spec(backend: str):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    te = backend == "te"
    return get_moe_module_spec(use_te=te, num_experts=NUM_EXPERTS, moe_grouped_gemm=te)


def build_layer(spec, config):
    from megatron.core.transformer.spec_utils import build_module

    if isinstance(spec, functools.partial):  # megatron-core 0.19 MLP builders
        layer = spec(config=config, layer_number=1)
    else:  # 0.16 ModuleSpec
        layer = build_module(spec, config=config, layer_number=1)
    layer.set_layer_number(1)
    return layer.cuda().train()


def build_variants(backend: str, permute_fusion: bool) -> tuple[dict[str, torch.nn.Module], bool]:
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.patch import apply_compat_fixes, with_replay_router

    apply_compat_fixes()  # megatron-core 0.16 without TE: unbound te_general_gemm

    permute_fusion = permute_fusion and backend == "te"  # fused permute is a TE kernel
    try:
        plain = layer_config(backend, permute_fusion)
    except (ValueError, AssertionError) as exc:
        if not permute_fusion:
            raise
        print(f"moe_permute_fusion unavailable ({exc}); running without it")
        permute_fusion = False
        plain = layer_config(backend, permute_fusion)
    spec = moe_spec(backend)

    RouterReplay.clear_global_router_replay_instances()
    layers = {"none": build_layer(spec, plain)}
    for name, collect in (("ours", True), ("ours_nometrics", False)):
        replay_spec = with_replay_router(
            spec, RouterReplayConfig(mode="r2", collect_metrics=collect)
        )
        layers[name] = build_layer(replay_spec, plain)
    RouterReplay.clear_global_router_replay_instances()
    native_config = layer_config(backend, permute_fusion, moe_enable_routing_replay=True)
    layers["native"] = build_layer(spec, native_config)
    native_count = len(RouterReplay.global_router_replay_instances)
    if native_count != 1:
        fail(f"expected 1 native RouterReplay instance, found {native_count}")

    reference = layers["none"].state_dict()
    for name in ("native", "ours", "ours_nometrics"):
        layers[name].load_state_dict(reference)
    return {name: layers[name] for name in VARIANTS}, permute_fusion


# ------------------------------------------------------------------------------------ timing
def time_steps(
    steps: dict[str, Callable[[], None]],
    cleanup: Callable[[], None],
    warmup: int,
    reps: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
            cleanup()
    torch.cuda.synchronize()
    gpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            steps[name]()
            end.record()
            end.synchronize()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            gpu[name].append(start.elapsed_time(end))
            cleanup()
    return gpu, wall


def count_syncs(step: Callable[[], None], cleanup: Callable[[], None]) -> int | str:
    """Host syncs in one step, as reported by torch's CUDA sync debug mode."""
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception as exc:  # counting is informative only
        return f"n/a ({type(exc).__name__})"
    finally:
        cleanup()
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------ benches
def run_bench(
    layers: dict[str, torch.nn.Module],
    tokens: tuple[int, int],
    warmup: int,
    reps: int,
) -> list[dict]:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2.replay.session import ReplaySession

    seq, batch = tokens
    sessions = {v: ReplaySession(layers[v]) for v in ("ours", "ours_nometrics")}
    torch.manual_seed(0)
    hidden = torch.randn(
        seq, batch, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    grad_out = torch.randn(seq, batch, HIDDEN, device="cuda", dtype=torch.bfloat16)

    with torch.no_grad(), sessions["ours"].recording() as record:
        layers["ours"].router(hidden)
    routes = record.routes  # {1: [[seq*batch, TOPK]]}: the live top-k
    native_routes = [routes[1][0]]

    def cleanup() -> None:
        hidden.grad = None
        for layer in layers.values():
            for param in layer.parameters():
                param.grad = None

    def router_step(layer) -> None:
        probs, _ = layer.router(hidden)
        probs.sum().backward()

    def layer_step(layer) -> None:
        output, _ = layer(hidden)
        output.backward(grad_out)

    def native(body: Callable) -> Callable[[], None]:
        def step() -> None:
            RouterReplay.set_replay_data(native_routes)
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            body(layers["native"])
            RouterReplay.clear_global_indices()

        return step

    # Validated and moved to the GPU once per rollout batch, as a trainer does.
    prepared = {v: sessions[v].prepare(routes) for v in ("ours", "ours_nometrics")}

    def ours(variant: str, body: Callable) -> Callable[[], None]:
        def step() -> None:
            with sessions[variant].replaying(prepared[variant]):
                body(layers[variant])

        return step

    # routing maps agree (replayed routes = live routes)
    with torch.no_grad():
        _, ref_map = layers["none"].router(hidden)
        maps = {}
        RouterReplay.set_replay_data(native_routes)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        maps["native"] = layers["native"].router(hidden)[1]
        RouterReplay.clear_global_indices()
        for variant in ("ours", "ours_nometrics"):
            with sessions[variant].replaying(routes):
                maps[variant] = layers[variant].router(hidden)[1]
    for variant, routing_map in maps.items():
        if not torch.equal(routing_map, ref_map):
            fail(f"{variant}: routing map differs from the live router's")
    sessions["ours"].metrics()

    rows = []
    name = f"{seq * batch} tokens"
    for bench, body in (("router", router_step), ("moe-layer", layer_step)):
        steps = {
            "none": functools.partial(body, layers["none"]),
            "native": native(body),
            "ours": ours("ours", body),
            "ours_nometrics": ours("ours_nometrics", body),
        }
        gpu, wall = time_steps(steps, cleanup, warmup, reps)
        syncs = {v: count_syncs(steps[v], cleanup) for v in VARIANTS}
        for v in VARIANTS:
            rows.append(
                dict(bench=f"{bench}, {name}", variant=v, gpu=gpu[v], wall=wall[v], syncs=syncs[v])
            )
    agreement = sessions["ours"].metrics().get("router_replay/replay_agreement")
    if agreement != 1.0:
        fail(f"ours replayed the live routes but reports agreement {agreement}")
    return rows


# ------------------------------------------------------------------------------------ report
def paired(row: dict, ref: dict, key: str) -> float:
    return statistics.median(a / b for a, b in zip(row[key], ref[key]))


def mark(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} {'✓' if value <= target else '✗'}"


def table(rows: list[dict]) -> str:
    lines = [
        "| benchmark | variant | CUDA-event median ms | IQR ms | wall median ms "
        "| ×none | ×native | host syncs/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["bench"], r["variant"]): r for r in rows}
    for r in rows:
        none, native = by[(r["bench"], "none")], by[(r["bench"], "native")]
        ours = r["variant"].startswith("ours")
        q = statistics.quantiles(r["gpu"], n=4)
        vs_none = mark(paired(r, none, "gpu"), TARGET_VS_NONE if ours else None)
        vs_native = (
            mark(paired(r, native, "gpu"), TARGET_VS_NATIVE if ours else None)
            if r["variant"] != "none"
            else ""
        )
        lines.append(
            f"| {r['bench']} | {LABELS[r['variant']]} | {statistics.median(r['gpu']):.3f} "
            f"| {q[0]:.3f}–{q[2]:.3f} | {statistics.median(r['wall']):.3f} "
            f"| {vs_none} | {vs_native} | {r['syncs']} |"
        )
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("megatron-core", "transformer-engine", "transformer_engine"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join([f"torch {torch.__version__}", *found])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument(
        "--tokens",
        default="4096x1,4096x4",
        help="comma-separated seq x batch token shapes (default 4096x1,4096x4)",
    )
    parser.add_argument("--no-permute-fusion", action="store_true")
    parser.add_argument("--backend", choices=("auto", "te", "local"), default="auto")
    args = parser.parse_args()

    backend = check_environment(args.backend)
    started = time.perf_counter()
    init_distributed()
    layers, permute_fusion = build_variants(backend, not args.no_permute_fusion)
    rows = []
    for shape in args.tokens.split(","):
        seq, batch = (int(x) for x in shape.lower().split("x"))
        rows += run_bench(layers, (seq, batch), args.warmup, args.reps)

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    print()
    print(f"### GPU: {torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB)")
    print()
    print(f"* {versions()}")
    print(
        f"* layer: hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOPK}, moe_ffn_hidden_size "
        f"{MOE_FFN} (SwiGLU), bf16, fp32 router, {EXPERTS[backend]}, alltoall, EP=TP=1, "
        f"moe_permute_fusion={permute_fusion}"
    )
    print(f"* {args.warmup} warm-up + {args.reps} measured steps per variant, interleaved")
    command = " ".join(["torchrun --nproc-per-node 1 bench/gpu/bench_replay_gpu.py", *sys.argv[1:]])
    print(f"* command: `{command}`")
    print(f"* total run {time.perf_counter() - started:.0f} s")
    print()
    print(table(rows))

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
