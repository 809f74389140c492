"""Checkpoint conversion throughput (GB/s) and peak memory (RSS), world 1, CPU.

Run from the repository root (a few minutes; needs ~2 GB of free memory and disk)::

    OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 .venv/bin/python bench/bench_convert.py

Model: a random Qwen3-MoE (transformers' own class) of a few hundred MB in fp32: hidden 512,
4 layers, 32 experts of width 256, top-4, vocab 32000, written as safetensors (per-expert keys).
Each conversion runs in a fresh process that reports the wall time of the conversion call
(model build + tensor mapping + ``dist_checkpointing`` save/load + write; imports excluded),
its RSS right before the call and its peak RSS (``ru_maxrss``). ``GB/s`` = model bytes on disk
/ conversion seconds. ``peak - before`` is what the conversion itself added (see the notes
written with the table).

Results go to stdout and to ``bench/RESULTS.md``, section "## Checkpoint conversion (issue
6)": only that section is replaced; the file is re-read right before writing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "bench"))
from results import write_section  # noqa: E402  (bench/ is not a package)

HEADING = "## Checkpoint conversion (issue 6)"
SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    intermediate_size=1024,
    max_position_embeddings=4096,
    norm_topk_prob=True,
)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(direction: str, src: str, dst: str) -> None:
    """One conversion in this (fresh) process; prints a JSON line."""
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    from tests.support.dist import init_single_process

    init_single_process()
    from megatron_pr2.convert import hf_to_mcore, mcore_to_hf

    before = _rss_mb()
    start = time.perf_counter()
    if direction == "hf-to-mcore":
        hf_to_mcore(src, dst, show_progress=False)
    else:
        mcore_to_hf(src, dst, show_progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_mb": _peak_mb()}))


def make_model(folder: Path) -> int:
    """Write the random HF model (in a subprocess, so its memory is gone); bytes on disk."""
    code = (
        "import torch, transformers, sys; torch.manual_seed(0);"
        f"c = transformers.Qwen3MoeConfig(**{SHAPE!r});"
        "m = transformers.Qwen3MoeForCausalLM(c).float();"
        f"m.save_pretrained({str(folder)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_child(direction: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", direction, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        load_before = loadavg()
        model_bytes = make_model(work / "hf")
        rows = []
        for direction in ("hf-to-mcore", "mcore-to-hf"):
            runs = []
            for i in range(args.repeats):
                src = work / "hf" if direction == "hf-to-mcore" else work / "mcore"
                dst = work / ("mcore" if direction == "hf-to-mcore" else f"back{i}")
                if direction == "hf-to-mcore" and dst.exists():
                    shutil.rmtree(dst)
                runs.append(run_child(direction, src, dst))
                print(direction, runs[-1], flush=True)
            best = min(runs, key=lambda r: r["seconds"])
            rows.append((direction, best, [r["seconds"] for r in runs]))
        ckpt_bytes = sum(p.stat().st_size for p in (work / "mcore").iterdir())
        load_after = loadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        HEADING,
        "",
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores (shared with other "
        f"jobs: load average {load_before} before, {load_after} after), torch threads 1, "
        f"`bench/bench_convert.py`. Random Qwen3-MoE, fp32, {model_bytes / 1e6:.0f} MB of "
        f"safetensors (hidden 512, 4 layers, 32 experts × 256, vocab 32000); the torch_dist "
        f"checkpoint is {ckpt_bytes / 1e6:.0f} MB with the PR2 predictor. World 1, best of "
        f"{args.repeats} fresh processes.",
        "",
        "| direction | seconds (runs) | GB/s | RSS before (MB) | peak RSS (MB) | peak − before (MB) "
        "| × model size |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for direction, best, all_seconds in rows:
        added = best["peak_mb"] - best["rss_before_mb"]
        lines.append(
            f"| {direction} | {best['seconds']:.2f} ({', '.join(f'{s:.2f}' for s in all_seconds)}) "
            f"| {model_bytes / best['seconds'] / 1e9:.3f} | {best['rss_before_mb']:.0f} "
            f"| {best['peak_mb']:.0f} | {added:.0f} | {added * 2**20 / model_bytes:.2f} |"
        )
    lines += [
        "",
        "`peak − before` is the memory the conversion added on top of the imported libraries. "
        "hf-to-mcore: megatron's parameters (one model copy, built without megatron's random "
        "init since every weight is overwritten), `dist_checkpointing`'s save staging, and the HF "
        "tensors in flight (read one at a time, or one expert's slice of a fused tensor; the "
        "safetensors memory map is dropped every 64 MB read, since mapped pages count in RSS). "
        "mcore-to-hf: the model, plus one output shard (2 GB by default, so the whole output "
        "here: the split QKV and gate/up tensors are new, the rest are views). A load-everything "
        "converter holds the HF state dict and the model at once. Times include building the "
        "megatron model and `dist_checkpointing`'s save or load, which dominate at this size; "
        "the spread between runs is contention from other jobs on the 2 cores.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(HEADING, text, RESULTS_PATH)
        print(f"wrote {RESULTS_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
