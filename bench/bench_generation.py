"""Rollout throughput: the KV-cached engine against the recompute engine, side by side.

Both engines generate the same batch (``--rows`` right-padded prompts of 4-12 tokens, every row
forced to the full ``max_new_tokens``: eos is outside the sampled vocabulary) on the same bf16
model, recording routes as ``r3`` does. Every run is its own process (peak memory is per
process), engines alternate within each round so machine load drifts hit both. Reported per
shape and length: generated tokens per second (median over rounds), the KV / recompute ratio
of the medians, and peak memory (process max RSS on CPU, ``max_memory_allocated`` on CUDA) with
its growth over the model's footprint before generating. Target: >= 10x at 512 new tokens.

Run from the repo root on a quiet machine: ``.venv/bin/python bench/bench_generation.py``.
Writes its section of ``bench/RESULTS.md``; on a CUDA machine it prints the table only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "bench"))
from results import write_section  # noqa: E402  (bench/ is not a package)

HEADING = "## Rollout generation throughput (issue 14)"
ENGINES = ("recompute", "kv")


@dataclass(frozen=True)
class Shape:
    """A model size (the loop benchmark's shapes)."""

    description: str
    hidden_size: int
    ffn_hidden_size: int
    num_moe_experts: int
    moe_router_topk: int
    num_attention_heads: int
    num_layers: int = 2


SHAPES = {
    "tiny": Shape("2 layers, hidden 32, ffn 64, 8 experts, top-2, 4 heads", 32, 64, 8, 2, 4),
    "wide": Shape("2 layers, hidden 256, ffn 512, 32 experts, top-4, 8 heads", 256, 512, 32, 4, 8),
}
VOCAB = 64
PROMPT_LENGTHS = (4, 12)


def _setup() -> None:
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    import torch

    if torch.cuda.is_available():
        from megatron_pr2.commands.train import init_distributed_cuda

        init_distributed_cuda()
        return
    from tests.support.dist import init_single_process

    init_single_process()
    torch.set_num_threads(1)


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS mark (VmHWM) afresh, so the peak read after ``generate``
    is the generation's, not model building's. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset: bool) -> float:
    if reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _one_run(engine_name: str, shape_name: str, max_new: int, rows: int, seed: int) -> dict:
    """Child process: build the model, warm up, time one generate; tokens/s and memory."""
    _setup()
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import TinyMoEShape, build_model_chunks, moe_transformer_config
    from megatron_pr2.rl.engine import RolloutEngine, bf16_engine_config
    from megatron_pr2.rl.kv_engine import KVCacheEngine

    s = SHAPES[shape_name]
    max_seq = PROMPT_LENGTHS[1] + max_new
    shape = TinyMoEShape(
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads,
        num_moe_experts=s.num_moe_experts,
        moe_router_topk=s.moe_router_topk,
        vocab_size=VOCAB,
        max_sequence_length=max_seq,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = moe_transformer_config(shape)
    trainer = build_model_chunks(config, VOCAB, max_seq, RouterReplayConfig(mode="r3"))
    cls = KVCacheEngine if engine_name == "kv" else RolloutEngine
    # eos = the last id, which is never sampled: every row generates max_new tokens.
    engine = cls(
        bf16_engine_config(config),
        VOCAB,
        max_seq,
        pad_id=0,
        eos_id=VOCAB - 1,
        sample_vocab_size=VOCAB - 1,
    )
    engine.refresh(trainer, include_predictor=False)
    del trainer
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (rows,), generator=g)
    prompts = [torch.randint(1, VOCAB - 1, (int(n),), generator=g).tolist() for n in lengths]
    engine.generate(prompts, 2, generator=g)  # warm-up: first-call allocations and imports
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _current_rss_mib()
        reset = _reset_peak_rss()
    start = time.perf_counter()
    rollout = engine.generate(prompts, max_new, generator=g)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = int((rollout.lengths - rollout.prompt_lengths).sum())
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib(reset)
    return {
        "tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "peak_mib": peak,
        "growth_mib": max(0.0, peak - before),
    }


def _run_in_subprocess(engine: str, shape: str, max_new: int, rows: int, seed: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one-run",
        json.dumps({"engine": engine, "shape": shape, "max_new": max_new, "rows": rows}),
        "--seed",
        str(seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} {shape} {max_new} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(shape: str, max_new: int, rows: int, repeats: int) -> dict[str, list[dict]]:
    """``repeats`` rounds, each running both engines (order alternating per round)."""
    runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
    for rep in range(repeats):
        order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
        for name in order:
            runs[name].append(_run_in_subprocess(name, shape, max_new, rows, seed=rep))
    return runs


def table(results: dict[tuple[str, int], dict[str, list[dict]]]) -> str:
    lines = [
        "| shape | new tokens | engine | runs | tokens/s (median) | kv / recompute "
        "| peak memory (MiB) | growth while generating (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (shape, max_new), runs in results.items():
        medians = {
            name: statistics.median(r["tokens_per_s"] for r in runs[name]) for name in ENGINES
        }
        for name in ENGINES:
            ratio = f"{medians['kv'] / medians['recompute']:.1f}x" if name == "kv" else ""
            peak = max(r["peak_mib"] for r in runs[name])
            growth = max(r["growth_mib"] for r in runs[name])
            lines.append(
                f"| {shape} | {max_new} | {name} | {len(runs[name])} | {medians[name]:.1f} "
                f"| {ratio} | {peak:.0f} | {growth:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,wide", help=f"from {sorted(SHAPES)}")
    parser.add_argument("--max-new", default="128,512", help="new tokens per row, comma list")
    parser.add_argument("--rows", type=int, default=64, help="rollout rows (8 prompts x 8)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over both engines")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.one_run:
        run = json.loads(args.one_run)
        print(
            json.dumps(
                _one_run(run["engine"], run["shape"], run["max_new"], run["rows"], args.seed)
            )
        )
        return
    import torch

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = {}
    for shape in args.shapes.split(","):
        for max_new in (int(n) for n in args.max_new.split(",")):
            results[(shape, max_new)] = measure(shape, max_new, args.rows, args.repeats)
            print(table({(shape, max_new): results[(shape, max_new)]}), flush=True)
    body = table(results)
    total = time.perf_counter() - start
    if args.no_write or torch.cuda.is_available():
        print(body)
        return
    shapes = "; ".join(f"`{name}`: {SHAPES[name].description}" for name in args.shapes.split(","))
    command = " ".join(["python bench/bench_generation.py", *sys.argv[1:]])
    text = f"""{HEADING}

`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}
(1 thread), world 1, megatron_pr2 at commit {_commit()}, megatron-core {_mcore_version()};
{args.rows} rows (prompts of {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, vocabulary
{VOCAB}), every row generating all its new tokens, routes recorded (`r3`), bf16 engine copy.
Shapes: {shapes}. Each run in its own process, {args.repeats} rounds with the engine order
alternating ({total:.0f} s; load average {load_before:.2f} before). Peak memory is the
process's peak RSS during the timed `generate` (model and interpreter included; the kernel's
mark is reset just before it); growth is that peak over the RSS just before.

{body}

Target: kv >= 10x recompute at 512 new tokens.
"""
    write_section(HEADING, text, RESULTS_PATH)
    print(f"wrote {RESULTS_PATH.relative_to(ROOT)}")


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def _mcore_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


if __name__ == "__main__":
    main()
