"""Routing-replay overhead on CPU: plain megatron-core vs native ``RouterReplay`` vs megatron_pr2.

Run from the repository root (about 1 to 2 minutes on 2 cores)::

    .venv/bin/python bench/bench_replay.py
    .venv-mcore019/bin/python bench/bench_replay.py

Variants, measured side by side in one process (round-robin over repetitions, rotating the
start so no variant always runs first; medians reported, warm-up first):

* ``none``: the plain GPT / ``TopKRouter`` (``build_model_chunks(..., replay_config=None)``).
* ``native``: megatron-core's ``RouterReplay`` (``moe_enable_routing_replay=True``, plain spec):
  ``set_replay_data`` + ``REPLAY_FORWARD`` before each forward, ``clear_global_indices`` after
  each step. In the GPT step a forward pre-hook on the model chunk sets each microbatch's routes
  (the native API holds one target per router, so a per-microbatch plan needs a caller hook).
* ``ours``: ``ReplayTopKRouter`` via ``RouterReplayConfig(mode="r2")`` and
  ``ReplaySession.replaying(routes)`` around the step, with ``collect_metrics=True`` (GPT step:
  plus one ``session.metrics()`` per step, as a trainer calls it) and ``collect_metrics=False``.

All variants share one set of weights and replay the routes the live router picks, so every
variant sends the same tokens to the same experts and does the same expert work; the script
checks that the outputs agree. Every benchmark is repeated on ``--builds`` fresh builds of its
models and the rounds pooled, so no variant keeps one build's lucky or unlucky allocation.

Benchmarks: (1) the router alone, forward + backward of ``probs.sum()`` on a ``[seq, batch,
hidden]`` input requiring grad, at a Qwen3-30B-A3B-like router ratio scaled to CPU and at a tiny
shape; (2) one tiny-GPT training step through ``lm_forward_backward`` (4 microbatches).

Results go to stdout and to ``bench/RESULTS.md``, section "## Routing replay (issue 2)": the
subsection for this megatron-core version is replaced, other subsections (the other version's
results, hand-written analysis) are kept.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTION_TITLE = "## Routing replay (issue 2)"
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
VARIANTS = ("none", "native", "ours", "ours_nometrics")
LABELS = {
    "none": "none (plain megatron)",
    "native": "native RouterReplay",
    "ours": "ours (defaults: metrics on, every 16th token)",
    "ours_nometrics": "ours (collect_metrics=False)",
}
TARGET_VS_NATIVE = 1.02
TARGET_VS_NONE = 1.05


def init_world1() -> None:
    if torch.cuda.is_available():
        raise SystemExit(
            "bench/bench_replay.py is the CPU benchmark; on a GPU run "
            "`torchrun --nproc-per-node 1 bench/gpu/bench_replay_gpu.py`"
        )
    from tests.support.dist import init_single_process

    init_single_process()


# ------------------------------------------------------------------------------------ timing
def measure(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Per-step wall times in ms. Variants interleave round-robin; the start rotates."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


@dataclass
class Row:
    bench: str
    variant: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.times, n=4)
        return q[0], q[2]


# ------------------------------------------------------------------------------------ models
def build_variants(shape, build_kwargs: dict) -> dict[str, list]:
    """The four models, sharing the weights of ``none``. Native's routers are the only
    entries of the global ``RouterReplay`` list when this returns."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import build_model_chunks, moe_transformer_config

    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(1234)
    plain = moe_transformer_config(shape)
    models = {"none": build_model_chunks(plain, replay_config=None, **build_kwargs)}
    ours_cfg = {
        "ours": RouterReplayConfig(mode="r2"),
        "ours_nometrics": RouterReplayConfig(mode="r2", collect_metrics=False),
    }
    for name, replay_config in ours_cfg.items():
        models[name] = build_model_chunks(plain, replay_config=replay_config, **build_kwargs)
    RouterReplay.clear_global_router_replay_instances()
    native_cfg = moe_transformer_config(shape, moe_enable_routing_replay=True)
    models["native"] = build_model_chunks(native_cfg, replay_config=None, **build_kwargs)
    reference = models["none"][0].state_dict()
    for name in ("native", "ours", "ours_nometrics"):
        models[name][0].load_state_dict(reference)
    return {name: models[name] for name in VARIANTS}


def clear_grads(chunks) -> None:
    for chunk in chunks:
        for param in chunk.parameters():
            param.grad = None


def first_router(chunks):
    return chunks[0].decoder.layers[0].mlp.router


# ------------------------------------------------------------------------------------ benches
def bench_router(name: str, shape, seq: int, batch: int, warmup: int, reps: int) -> list[Row]:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2.replay.session import ReplaySession

    models = build_variants(
        shape, dict(vocab_size=shape.vocab_size, max_sequence_length=shape.max_sequence_length)
    )
    routers = {v: first_router(chunks) for v, chunks in models.items()}
    assert len(RouterReplay.global_router_replay_instances) == 1
    assert routers["native"].router_replay is RouterReplay.global_router_replay_instances[0]
    sessions = {v: ReplaySession(models[v]) for v in ("ours", "ours_nometrics")}

    torch.manual_seed(0)
    hidden = torch.randn(seq, batch, shape.hidden_size, requires_grad=True)
    with torch.no_grad(), sessions["ours"].recording() as record:
        routers["ours"](hidden)
    routes = record.routes  # {1: [[seq*batch, topk]]}, the live top-k
    native_routes = [routes[1][0]]

    def run(router) -> torch.Tensor:
        probs, _ = router(hidden)
        probs.sum().backward()
        hidden.grad = None
        router.weight.grad = None
        return probs

    def step_none() -> None:
        run(routers["none"])

    def step_native() -> None:
        RouterReplay.set_replay_data(native_routes)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        run(routers["native"])
        RouterReplay.clear_global_indices()

    # Validated once per rollout batch (as a trainer does), then replayed every pass.
    prepared = {v: sessions[v].prepare(routes) for v in ("ours", "ours_nometrics")}

    def ours_step(variant: str) -> Callable[[], None]:
        def step() -> None:
            with sessions[variant].replaying(prepared[variant]):
                run(routers[variant])

        return step

    steps = {
        "none": step_none,
        "native": step_native,
        "ours": ours_step("ours"),
        "ours_nometrics": ours_step("ours_nometrics"),
    }

    # same probs and routing map everywhere (replayed routes = live routes)
    with torch.no_grad():
        ref_probs, ref_map = routers["none"](hidden)
        RouterReplay.set_replay_data(native_routes)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        outs = {"native": routers["native"](hidden)}
        RouterReplay.clear_global_indices()
    for variant in ("ours", "ours_nometrics"):
        with sessions[variant].replaying(routes), torch.no_grad():
            outs[variant] = routers[variant](hidden)
    for variant, (probs, routing_map) in outs.items():
        assert torch.equal(routing_map, ref_map), f"{name}/{variant}: routing map differs"
        torch.testing.assert_close(probs, ref_probs, msg=f"{name}/{variant}: probs differ")
    sessions["ours"].metrics()  # drop the counters of the check

    times = measure(steps, warmup, reps)
    rows = [Row(name, v, times[v]) for v in VARIANTS]

    # components of ours, timed alone
    state = sessions["ours"].state(1)
    scores = torch.randn(seq * batch, shape.num_moe_experts)

    raw_routes = {layer: list(routes[layer]) for layer in routes}  # plain tensors: validated

    def validate() -> None:  # once per rollout batch: session.prepare(routes)
        sessions["ours"].prepare(raw_routes)

    def metrics_topk() -> None:  # what collect_metrics adds per router forward
        live = torch.topk(scores, shape.moe_router_topk, dim=1)[1]
        state._count(routes[1][0], live, None)

    parts = measure({"validate": validate, "metrics": metrics_topk}, warmup, reps)
    rows.append(Row(name, "part: route validation (once per rollout batch)", parts["validate"]))
    rows.append(Row(name, "part: live top-k + metrics accumulate", parts["metrics"]))
    state.take_counters()
    return rows


def bench_gpt(
    name: str, shape, batch: int, seq: int, microbatches: int, warmup: int, reps: int
) -> list[Row]:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2.models.gpt import LMBatch, lm_forward_backward
    from megatron_pr2.replay.session import ReplaySession

    models = build_variants(
        shape, dict(vocab_size=shape.vocab_size, max_sequence_length=shape.max_sequence_length)
    )
    native_instances = list(RouterReplay.global_router_replay_instances)
    assert len(native_instances) == shape.num_layers
    sessions = {v: ReplaySession(models[v]) for v in ("ours", "ours_nometrics")}
    layers = sessions["ours"].layers

    generator = torch.Generator().manual_seed(0)
    batches = [LMBatch.random(batch, seq, shape.vocab_size, generator) for _ in range(microbatches)]
    with torch.no_grad(), sessions["ours"].recording() as record:
        lm_forward_backward(models["ours"], batches, forward_only=True)
    routes = record.routes
    # native: one list (one tensor per router, construction = layer order) per microbatch
    native_plan = [[routes[layer][mb] for layer in layers] for mb in range(microbatches)]
    cursor = {"mb": 0}

    def set_next_microbatch(_module, _args, _kwargs) -> None:
        RouterReplay.set_replay_data(native_plan[cursor["mb"]])
        cursor["mb"] += 1

    models["native"][0].register_forward_pre_hook(set_next_microbatch, with_kwargs=True)

    def losses(outputs) -> list[float]:
        return [float(o["lm_loss"]) for o in outputs]

    def step_none() -> list[float]:
        out = lm_forward_backward(models["none"], batches)
        clear_grads(models["none"])
        return losses(out)

    def step_native() -> list[float]:
        cursor["mb"] = 0
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        out = lm_forward_backward(models["native"], batches)
        RouterReplay.clear_global_indices()
        clear_grads(models["native"])
        return losses(out)

    last_metrics: dict[str, dict[str, float]] = {}

    # Validated once per rollout batch (as a trainer does), then replayed every pass.
    prepared = {v: sessions[v].prepare(routes) for v in ("ours", "ours_nometrics")}

    def ours_step(variant: str, with_metrics: bool) -> Callable[[], list[float]]:
        def step() -> list[float]:
            with sessions[variant].replaying(prepared[variant]):
                out = lm_forward_backward(models[variant], batches)
            if with_metrics:
                last_metrics[variant] = sessions[variant].metrics()
            clear_grads(models[variant])
            return losses(out)

        return step

    steps = {
        "none": step_none,
        "native": step_native,
        "ours": ours_step("ours", True),
        "ours_nometrics": ours_step("ours_nometrics", False),
    }
    reference = steps["none"]()
    for variant in ("native", "ours", "ours_nometrics"):
        got = steps[variant]()
        assert got == reference, f"{name}/{variant}: losses {got} != {reference}"
    agreement = last_metrics["ours"]["router_replay/replay_agreement"]
    assert agreement == 1.0, f"{name}: replay agreement {agreement} with the live routes"

    times = measure(steps, warmup, reps)
    rows = [Row(name, v, times[v]) for v in VARIANTS]

    raw_routes = {layer: list(routes[layer]) for layer in routes}  # plain tensors: validated

    def validate() -> None:  # once per rollout batch: session.prepare(routes)
        sessions["ours"].prepare(raw_routes)

    parts = measure({"validate": validate}, warmup, reps)
    rows.append(Row(name, "part: route validation (once per rollout batch)", parts["validate"]))
    return rows


def pooled_over_builds(builds: int, bench: Callable[[], list[Row]]) -> list[Row]:
    """Run ``bench`` on ``builds`` fresh builds of its models and pool their rounds.

    One build's allocation (where the weights land) can make a model a few percent faster or
    slower than an identical one, a bias repetitions within that build cannot remove: two
    identical builds of ours measured up to 1.5 % apart, and ours vs native went from 1.008x
    to 1.036x across three builds of the 128-token router. Rounds stay paired within a build.
    """
    merged: dict[tuple[str, str], Row] = {}
    for _ in range(builds):
        for row in bench():
            key = (row.bench, row.variant)
            if key in merged:
                merged[key].times.extend(row.times)
            else:
                merged[key] = row
    return list(merged.values())


# ------------------------------------------------------------------------------------ report
def fmt_ratio(value: float, target: float | None) -> str:
    text = f"{value:.3f}"
    if target is not None:
        text += " ✓" if value <= target else " ✗"
    return text


def paired_ratio(row: Row, reference: Row) -> float:
    """Median over rounds of this round's time / the reference's time in the same round."""
    return statistics.median(a / b for a, b in zip(row.times, reference.times, strict=True))


def table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | variant | median ms | IQR ms | ×none | ×native |",
        "|---|---|---:|---:|---:|---:|",
    ]
    by_key = {(r.bench, r.variant): r for r in rows}
    for row in rows:
        none = by_key[(row.bench, "none")]
        native = by_key[(row.bench, "native")]
        lo, hi = row.iqr
        is_ours = row.variant.startswith("ours")
        if row.variant.startswith("part:"):
            vs_none, vs_native = "", ""
        else:
            vs_none = fmt_ratio(paired_ratio(row, none), TARGET_VS_NONE if is_ours else None)
            vs_native = (
                fmt_ratio(paired_ratio(row, native), TARGET_VS_NATIVE if is_ours else None)
                if row.variant != "none"
                else ""
            )
        label = LABELS.get(row.variant, row.variant)
        lines.append(
            f"| {row.bench} | {label} | {row.median:.3f} | {lo:.3f}–{hi:.3f} "
            f"| {vs_none} | {vs_native} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


class LoadMeter:
    """CPU used by *other* processes on this machine since construction, in % of all cores
    (whole-machine busy time from /proc/stat minus this process's own CPU time)."""

    def __init__(self) -> None:
        self.start = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        own = os.times()
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields) - idle) / tick, sum(fields) / tick, own.user + own.system

    def others_percent(self) -> float | None:
        end = self.sample()
        if self.start is None or end is None:
            return None
        busy, total, own = (b - a for a, b in zip(self.start, end))
        return max(0.0, 100.0 * (busy - own) / max(total, 1e-9))


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def code_version() -> str:
    """The commit the measured megatron_pr2 comes from, and whether it has local edits."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "megatron_pr2"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted edits in megatron_pr2/" if dirty else "")


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(ROOT))
    except ValueError:
        exe_text = str(exe)
    script = Path(sys.argv[0])
    try:
        script_text = str(script.resolve().relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join([exe_text, script_text, *sys.argv[1:]])


def subsection(rows: list[Row], args: argparse.Namespace, total_s: float) -> str:
    from megatron_pr2.patch import megatron_core_version

    version = megatron_core_version()
    return "\n".join(
        [
            f"### megatron-core {version}",
            "",
            f"* date: {datetime.date.today().isoformat()}",
            f"* machine: {os.cpu_count()}-core CPU ({cpu_model()}), no GPU; "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}",
            f"* command (from the repo root): `{command_line()}`; megatron_pr2 at {code_version()}",
            f"* CPU used by other processes: {fmt_percent(args.load_before)} of the machine in "
            f"the 1 s before the run, {fmt_percent(args.load_during)} during it. Other "
            "processes on the 2 cores stall torch's 2-thread parallel regions (a tiny router "
            "step went from 0.35 ms to ~12 ms under a concurrent pytest), so only runs with "
            "~0% are meaningful",
            f"* repetitions: {args.builds} fresh builds of the models per benchmark, each with "
            f"{args.warmup} warm-up + {args.reps // args.builds} measured per variant (router), "
            f"{args.gpt_warmup} + {args.gpt_reps // args.builds} (GPT step); rounds pooled "
            f"over the builds; total run {total_s:.0f} s",
            "",
            table(rows),
            "",
        ]
    )


SECTION_INTRO = """\
Produced by `bench/bench_replay.py` (one subsection per megatron-core version; rerunning the
script replaces only its own version's subsection; other subsections are kept). Variants run
interleaved round-robin in one process, same weights, all replaying the live router's routes (so
expert work is identical; the script asserts equal routing maps / losses). Times are medians,
IQR is the 25th–75th percentile; ×none / ×native are medians of the per-round ratios (each round
runs every variant once, back to back), pooled over fresh builds of the models. ✓/✗ mark the targets for ours: ≤ 1.02× native replay and
≤ 1.05× none. `part:` rows time pieces of ours alone (not variants).

Shapes: `router-qwen3ish` = hidden 512, 128 experts, top-8, 4096 tokens (seq 1024 × batch 4), the
Qwen3-30B-A3B router ratio (hidden 2048 : 128 experts : top-8) scaled to CPU; `router-small` =
hidden 32, 8 experts, top-2, 128 tokens; `gpt-step` = `TinyMoEShape` GPT (4 layers, hidden 32, 8
experts, top-2), 4 microbatches of batch 2 × seq 64, one `lm_forward_backward`. All run on the
test CPU shim (tests/support/cpu_shim.py), whose `TorchFunctionMode` adds a Python call to every
torch op for every variant alike (~2 µs per op: 5.0 vs 3.0 µs for a tiny op), which inflates
the cost of op-heavy code such as route validation.
"""


def write_results(sub: str, version_heading: str) -> None:
    text = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else "# Benchmark results\n"
    start = text.find(SECTION_TITLE + "\n")
    if start == -1:
        before, old_section, after = text.rstrip("\n") + "\n\n", "", ""
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION_TITLE) :], re.MULTILINE)
        end = start + len(SECTION_TITLE) + nxt.start() if nxt else len(text)
        before, old_section, after = text[:start], text[start:end], text[end:]
    # keep every ### subsection of the old section except this version's
    kept = []
    for part in re.split(r"^(?=### )", old_section, flags=re.MULTILINE)[1:]:
        if not part.startswith(version_heading + "\n"):
            kept.append(part.rstrip("\n") + "\n")
    versions = sorted(
        [p for p in kept if p.startswith("### megatron-core ")] + [sub.rstrip("\n") + "\n"]
    )
    others = [p for p in kept if not p.startswith("### megatron-core ")]
    body = "\n".join([SECTION_TITLE, "", SECTION_INTRO, *versions, *others])
    RESULTS_PATH.write_text(before + body.rstrip("\n") + "\n" + ("\n" + after if after else ""))


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200, help="router benches, per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpt-reps", type=int, default=45, help="GPT step, per variant")
    parser.add_argument(
        "--builds", type=int, default=3, help="fresh model builds per bench; reps split evenly"
    )
    parser.add_argument("--gpt-warmup", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    meter = LoadMeter()
    time.sleep(1.0)
    args.load_before = meter.others_percent()
    if args.load_before is not None and args.load_before > 5:
        print(f"warning: other processes use {args.load_before:.0f}% of the CPU; noisy timings")
    meter = LoadMeter()
    start = time.perf_counter()
    init_world1()
    from megatron_pr2.models.gpt import TinyMoEShape
    from megatron_pr2.patch import megatron_core_version

    rows: list[Row] = []
    qwen = TinyMoEShape(
        num_layers=1,
        hidden_size=512,
        ffn_hidden_size=32,
        num_attention_heads=8,
        num_moe_experts=128,
        moe_router_topk=8,
        vocab_size=128,
        max_sequence_length=1024,
    )
    small = TinyMoEShape(num_layers=1, max_sequence_length=64)
    reps, gpt_reps = args.reps // args.builds, args.gpt_reps // args.builds
    rows += pooled_over_builds(
        args.builds, lambda: bench_router("router-qwen3ish", qwen, 1024, 4, args.warmup, reps)
    )
    rows += pooled_over_builds(
        args.builds, lambda: bench_router("router-small", small, 64, 2, args.warmup, reps)
    )
    rows += pooled_over_builds(
        args.builds,
        lambda: bench_gpt("gpt-step", TinyMoEShape(), 2, 64, 4, args.gpt_warmup, gpt_reps),
    )
    total = time.perf_counter() - start
    args.load_during = meter.others_percent()

    sub = subsection(rows, args, total)
    print(sub)
    if not args.no_write:
        write_results(sub, f"### megatron-core {megatron_core_version()}")
        print(f"wrote {RESULTS_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
