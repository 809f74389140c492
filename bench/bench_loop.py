"""Throughput of the whole GRPO loop per replay mode, measured side by side in one run.

Each mode runs the same config (the tiny task, off-4, the evidence run's supervised warm start,
so rewards, advantages and router drift are those of a real run; ``wide`` scales the model up)
for ``--steps`` GRPO steps. Every run is its own process; ``--repeats`` rounds go over the
modes, the order rotated each round, so machine load drifts hit every mode alike. Reported:
trained tokens per second (prompt + response tokens of the rollout batch / step wall time, step
1 of each run dropped as warm-up), the step time ratio to ``r2`` and the phase times. Target:
``pr2`` <= 1.05x ``r2`` wall time.

Run from the repo root on a quiet machine: ``.venv/bin/python bench/bench_loop.py``. Writes its
section of ``bench/RESULTS.md``. On a CUDA machine (``python bench/bench_loop.py``, world 1) it
prints the table only: paste it with the card's name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
sys.path.insert(0, str(ROOT / "bench"))
from results import write_section  # noqa: E402  (bench/ is not a package)

HEADING = "## GRPO loop throughput (issue 5)"
MODES = ("none", "r2", "r3", "pr2", "pr2_r3")
CONFIG = "examples/tiny/grpo_off4.yaml"


@dataclass(frozen=True)
class Shape:
    """A model size for the loop: config overrides and how long to run it."""

    description: str
    overrides: tuple[str, ...]
    steps: int
    repeats: int
    sft_steps: int


SHAPES = {
    "tiny": Shape("the evidence config: 2 layers, hidden 32, 8 experts, top-2", (), 10, 3, 300),
    "wide": Shape(
        "2 layers, hidden 256, ffn 512, 32 experts (hidden/experts = 8), top-4, 8 heads",
        (
            "policy.hidden_size=256",
            "policy.ffn_hidden_size=512",
            "policy.num_moe_experts=32",
            "policy.moe_router_topk=4",
            "policy.num_attention_heads=8",
        ),
        6,
        2,
        100,
    ),
}


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
    # after init_single_process, which sizes the pool for tests: one thread leaves the second
    # core to the OS, so other processes do not stall a 2-thread parallel region
    torch.set_num_threads(1)


PHASES = {
    "total": "timing/train/total_step_time",
    "generation": "timing/train/generation",
    "logprobs": "timing/train/policy_and_reference_logprobs",
    "training": "timing/train/policy_training",
}


def _config(mode: str, shape: Shape, log_dir: str):
    from megatron_pr2.rl.config import load_config

    overrides = [
        f"policy.router_replay.mode={mode}",
        f"grpo.max_num_steps={shape.steps}",
        f"grpo.sft_warmup_steps={shape.sft_steps}",
        f"logger.log_dir={log_dir}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        *shape.overrides,
    ]
    return load_config(str(ROOT / CONFIG), overrides)


def _sample(metrics: dict[str, float]) -> dict[str, float]:
    return {"tokens": metrics["train/num_tokens"], **{k: metrics[v] for k, v in PHASES.items()}}


def _run(mode: str, shape: Shape, log_dir: str) -> list[dict[str, float]]:
    """Tokens and phase seconds of each step after the first."""
    from megatron_pr2.rl.trainer import train

    return [_sample(m) for m in train(_config(mode, shape, log_dir))[1:]]


def _run_pair(modes: list[str], shape: Shape, log_dir: str) -> dict[str, list[dict[str, float]]]:
    """Two runs in one process, stepped alternately (the mode that goes first alternates), so
    each step of one mode has a step of the other next to it in time: the machine's slow phases
    (tens of seconds on a shared VM) hit both sides of a pair."""
    from megatron_pr2.rl.trainer import training_steps

    runs = {mode: training_steps(_config(mode, shape, f"{log_dir}/{mode}")) for mode in modes}
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for step in range(shape.steps):
        for mode in modes if step % 2 == 0 else modes[::-1]:
            metrics = next(runs[mode])
            if step > 0:  # the first step of each run is warm-up
                samples[mode].append(_sample(metrics))
    return samples


Runs = dict[str, list[list[dict[str, float]]]]  # mode -> one list of step samples per round


def measure(shape: Shape, modes: tuple[str, ...] = MODES) -> Runs:
    """Every run in a fresh process (a finished trainer's model stays alive, so runs sharing a
    process are not independent), mode order rotated each round so no mode always runs first
    or last."""
    results: Runs = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(shape.repeats):
            shift = rep % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                results[mode].append(_run_in_subprocess(mode, shape, f"{tmp}/{mode}-{rep}"))
    return results


def _run_in_subprocess(mode: str, shape: Shape, log_dir: str) -> Any:
    command = [sys.executable, __file__, "--one-run", mode, json.dumps(asdict(shape)), log_dir]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _one_run(mode: str, shape_json: str, log_dir: str) -> None:
    """Child process: one run (or ``a,b``: a stepped pair), its samples as JSON on the last
    stdout line."""
    _setup()
    shape = Shape(**json.loads(shape_json))
    if "," in mode:
        print(json.dumps(_run_pair(mode.split(","), shape, log_dir)))
    else:
        print(json.dumps(_run(mode, shape, log_dir)))


def measure_pairs(shape: Shape, mode: str, rounds: int) -> list[dict[str, list[dict]]]:
    """``rounds`` fresh processes, each stepping ``mode`` and ``r2`` alternately."""
    with tempfile.TemporaryDirectory() as tmp:
        return [_run_in_subprocess(f"{mode},r2", shape, f"{tmp}/pair-{i}") for i in range(rounds)]


def pairs_table(mode: str, rounds: list[dict[str, list[dict]]]) -> str:
    """Per pair of adjacent steps: ``mode`` / ``r2`` for the step time, the seconds per trained
    token, and each replay-touched phase; medians and IQR over all pairs."""

    def ratios(key: str) -> list[float]:
        out = []
        for run in rounds:
            for a, b in zip(run[mode], run["r2"], strict=True):
                if key == "s/token":
                    out.append(_seconds_per_token([a]) / _seconds_per_token([b]))
                else:
                    out.append(a[key] / b[key])
        return out

    lines = ["| ratio pr2 / r2 over adjacent steps | pairs | median | IQR |", "|---|---:|---:|---|"]
    for label, key in (
        ("step time", "total"),
        ("seconds per trained token", "s/token"),
        ("old log-probs pass", "logprobs"),
        ("training (4 mini-steps)", "training"),
    ):
        values = ratios(key)
        q = statistics.quantiles(values, n=4)
        lines.append(
            f"| {label} | {len(values)} | {statistics.median(values):.3f}x "
            f"| {q[0]:.3f}–{q[2]:.3f} |"
        )
    return "\n".join(lines)


def _median(samples: list[dict[str, float]], phase: str) -> float:
    return statistics.median(sample[phase] for sample in samples)


def _seconds_per_token(samples: list[dict[str, float]]) -> float:
    return sum(s["total"] for s in samples) / sum(s["tokens"] for s in samples)


def table(runs: Runs) -> str:
    results = {mode: [s for run in per_round for s in run] for mode, per_round in runs.items()}
    r2 = {phase: _median(results["r2"], phase) for phase in PHASES}
    lines = [
        "| mode | steps timed | median step (s) | tokens/s | step vs r2 | generation (s) "
        "| old log-probs (s) | training (s) | log-probs + training vs r2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, samples in results.items():
        step = _median(samples, "total")
        tokens_per_s = 1.0 / _seconds_per_token(samples)
        replay_part = _median(samples, "logprobs") + _median(samples, "training")
        lines.append(
            f"| {mode} | {len(samples)} | {step:.3f} | {tokens_per_s:.0f} "
            f"| {step / r2['total']:.3f}x | {_median(samples, 'generation'):.3f} "
            f"| {_median(samples, 'logprobs'):.3f} | {_median(samples, 'training'):.3f} "
            f"| {replay_part / (r2['logprobs'] + r2['training']):.3f}x |"
        )
    return "\n".join(lines)


def rounds_table(runs: Runs) -> str:
    """Each run against the ``r2`` run of the same round: median step time and seconds per
    trained token, as ratios. Runs are minutes apart, so the machine's drift stays in these
    ratios; :func:`pairs_table` is the comparison that removes it."""
    lines = [
        "| mode | rounds | step vs r2, per round | median | s/token vs r2, per round | median |",
        "|---|---:|---|---:|---|---:|",
    ]
    for mode, per_round in runs.items():
        if mode == "r2":
            continue
        pairs = list(zip(per_round, runs["r2"], strict=True))
        step = [_median(run, "total") / _median(ref, "total") for run, ref in pairs]
        token = [_seconds_per_token(run) / _seconds_per_token(ref) for run, ref in pairs]
        lines.append(
            f"| {mode} | {len(pairs)} | {', '.join(f'{r:.2f}' for r in step)} "
            f"| {statistics.median(step):.3f}x | {', '.join(f'{r:.2f}' for r in token)} "
            f"| {statistics.median(token):.3f}x |"
        )
    return "\n".join(lines)


def write_results(text: str) -> None:
    write_section(HEADING, text, RESULTS_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,wide", help=f"from {sorted(SHAPES)}")
    parser.add_argument("--steps", type=int, help="GRPO steps per run (default: per shape)")
    parser.add_argument("--sft-steps", type=int, help="warm-start steps, not timed (per shape)")
    parser.add_argument("--repeats", type=int, help="rounds over the modes (per shape)")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of the modes; r2 is kept")
    parser.add_argument(
        "--pair-rounds", type=int, default=3, help="processes stepping pr2 and r2 alternately"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--one-run", nargs=3, metavar=("MODE", "SHAPE_JSON", "LOG_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.one_run:
        _one_run(*args.one_run)
        return
    import torch

    modes = tuple(m for m in MODES if m in args.modes.split(",") or m == "r2")
    sections = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        shape = replace(
            shape,
            steps=args.steps or shape.steps,
            sft_steps=args.sft_steps if args.sft_steps is not None else shape.sft_steps,
            repeats=args.repeats or shape.repeats,
        )
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        runs = measure(shape, modes)
        body = table(runs) + "\n\nPaired by round (separate processes):\n\n" + rounds_table(runs)
        if args.pair_rounds and "pr2" in modes:
            pairs = measure_pairs(shape, "pr2", args.pair_rounds)
            body += (
                f"\n\nStepped pairs (pr2 and r2 in one process, alternating steps, "
                f"{args.pair_rounds} processes):\n\n" + pairs_table("pr2", pairs)
            )
        total = time.perf_counter() - start
        print(f"### {name}\n{body}")
        sections.append(
            f"""### `{name}`: {shape.description}

{shape.sft_steps} supervised warm-start steps (not timed), {shape.steps} GRPO steps per run,
{shape.repeats} rounds over the modes, each run in a fresh process, the mode order rotated every
round ({total:.0f} s; load average {load_before:.2f} before).

{body}
"""
        )
    if args.no_write or torch.cuda.is_available():
        return
    command = " ".join(["python bench/bench_loop.py", *sys.argv[1:]])
    text = f"""{HEADING}

`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}
(1 thread), world 1, megatron_pr2 at commit {_commit()}; config `{CONFIG}` (8 prompts x 8
samples, off-4, micro-batch 8) with the shape overrides below. Step time = refit + generation +
rewards + old log-probs + 4 mini-steps; the first step of each run is dropped. Phase columns are
medians of `timing/train/*`; rollouts differ between modes after the first update, so the
log-probs + training column (the passes that replay routes and train the predictor) isolates
replay cost from generation length.

{chr(10).join(sections)}
Target: `pr2` <= 1.05x `r2` wall time. `r3`/`pr2_r3` add the engine's route recording forward;
`pr2` adds the predictor forward on the recording pass and its loss on mini-steps 1-3.
"""
    write_results(text)
    print(f"wrote {RESULTS_PATH.relative_to(ROOT)}")


def _commit() -> str:
    import subprocess

    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
