"""Throughput of the whole GRPO loop per replay mode, measured side by side in one run.

Each mode runs the same config (the tiny task, off-4, no warm start) for ``--steps`` GRPO
steps; modes are interleaved round robin over ``--repeats`` rounds so that machine load drifts
hit every mode alike. Reported: trained tokens per second (prompt + response tokens of the
rollout batch / step wall time, step 1 of each run dropped as warm-up) and the step time ratio
to ``r2``. Target: ``pr2`` <= 1.05x ``r2`` wall time.

Run from the repo root on a quiet machine: ``.venv/bin/python bench/bench_loop.py``. Writes its
section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "bench"))
from results import write_section  # noqa: E402  (bench/ is not a package)

HEADING = "## GRPO loop throughput (issue 5)"
MODES = ("none", "r2", "r3", "pr2", "pr2_r3")
CONFIG = "examples/tiny/grpo_off4.yaml"


def _setup() -> None:
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    import torch

    if torch.cuda.is_available():
        raise SystemExit("this benchmark is the CPU one")
    torch.set_num_threads(1)
    from tests.support.dist import init_single_process

    init_single_process()


def _run(mode: str, steps: int, log_dir: str) -> list[tuple[float, float]]:
    """(tokens, seconds) of each step after the first."""
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train

    overrides = [
        f"policy.router_replay.mode={mode}",
        f"grpo.max_num_steps={steps}",
        "grpo.sft_warmup_steps=0",
        f"logger.log_dir={log_dir}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
    ]
    history = train(load_config(str(ROOT / CONFIG), overrides))
    return [(m["train/num_tokens"], m["timing/train/total_step_time"]) for m in history[1:]]


def measure(steps: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for mode in MODES:
                results[mode] += _run(mode, steps, f"{tmp}/{mode}-{rep}")
    return results


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    r2_step = statistics.median(s for _, s in results["r2"])
    lines = [
        "| mode | steps timed | median step (s) | tokens/s | step time vs r2 |",
        "|---|---|---|---|---|",
    ]
    for mode, samples in results.items():
        step = statistics.median(s for _, s in samples)
        tokens_per_s = sum(t for t, _ in samples) / sum(s for _, s in samples)
        lines.append(
            f"| {mode} | {len(samples)} | {step:.3f} | {tokens_per_s:.0f} | {step / r2_step:.3f}x |"
        )
    return "\n".join(lines)


def write_results(text: str) -> None:
    write_section(HEADING, text, RESULTS_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _setup()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = measure(args.steps, args.repeats)
    total = time.perf_counter() - start
    body = table(results)
    print(body)
    if args.no_write:
        return
    import torch

    text = f"""{HEADING}

`{" ".join(["python bench/bench_loop.py", *sys.argv[1:]])}` on {platform.machine()}, {os.cpu_count()} CPU
cores, torch {torch.__version__} (1 thread), world 1; config `{CONFIG}` (8 prompts x 8 samples,
off-4, micro-batch 8) without warm start, {args.steps} steps per run, modes interleaved over
{args.repeats} rounds ({total:.0f} s in all; load average {load_before:.2f} before). Step time =
refit + generation + rewards + old log-probs + 4 mini-steps; the first step of each run is
dropped.

{body}

Target: `pr2` <= 1.05x `r2` wall time. `r3`/`pr2_r3` add the engine's route recording forward;
`pr2` adds the predictor forward on the recording pass and its loss on mini-steps 1-3. The
rollout batches differ between modes after the first update, hence tokens/s as well as step time.
"""
    write_results(text)
    print(f"wrote {RESULTS_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
