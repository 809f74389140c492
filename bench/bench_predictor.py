"""PR2 predictor overhead and cache memory, measured side by side in one run.

1. Recording (old-log-prob, forward-only) pass: ``r2`` vs ``pr2`` (predictor applied, features
   cached). Target: pr2 <= 1.03x.
2. Update step (forward + backward, routes replayed): ``r2`` vs ``pr2`` with the predictor loss.
   Target: pr2 <= 1.02x. Model at a Qwen3-30B-A3B-like hidden/expert ratio (H/E = 16).
3. Cache memory: bytes per token of the batch, sampled bf16 cache vs an unbounded fp32 cache, for
   the Qwen3-30B-A3B shape (arithmetic), and the predictive top-k accuracy reached with the
   sampled vs the full cache on a synthetic router drift (measured). Targets: >= 50x less memory,
   accuracy within 1 point.

Run from the repo root: ``.venv/bin/python bench/bench_predictor.py``. Writes its section of
``bench/RESULTS.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## PR2 predictor (issue 3)"


def _setup() -> None:
    sys.path.insert(0, REPO_ROOT)
    warnings.filterwarnings("ignore")
    import torch

    if torch.cuda.is_available():
        raise SystemExit("this benchmark is the CPU one; see bench/gpu/ for the GPU script")
    from tests.support.dist import init_single_process

    init_single_process()


def _build(mode: str, shape, seed: int = 3, **predictor):
    import torch

    from megatron_pr2.config import PredictorConfig, RouterReplayConfig
    from megatron_pr2.models.gpt import build_model_chunks, moe_transformer_config
    from megatron_pr2.replay.session import ReplaySession

    torch.manual_seed(seed)
    config = moe_transformer_config(shape)
    replay = RouterReplayConfig(mode=mode, predictor=PredictorConfig(**predictor))
    chunks = build_model_chunks(config, shape.vocab_size, shape.max_sequence_length, replay)
    return chunks, ReplaySession(chunks)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_overhead(reps: int = 7) -> dict:
    import torch

    from megatron_pr2.models.gpt import LMBatch, TinyMoEShape, lm_forward_backward

    shape = TinyMoEShape(
        num_layers=2,
        hidden_size=512,
        ffn_hidden_size=256,
        num_attention_heads=8,
        num_moe_experts=32,
        moe_router_topk=4,
        vocab_size=512,
        max_sequence_length=256,
    )
    generator = torch.Generator().manual_seed(0)
    batches = [LMBatch.random(2, 256, shape.vocab_size, generator) for _ in range(4)]
    variants = {mode: _build(mode, shape) for mode in ("r2", "pr2")}
    # The predictor stays at zero: it costs the same compute as a trained one (offset matmul,
    # predicted top-k, feature cache, loss) while routes stay identical to r2's, so expert load,
    # hence expert compute, is the same in both variants and the ratio is pure PR2 overhead.
    records = {}

    def record(mode):
        chunks, session = variants[mode]
        with torch.no_grad(), session.recording() as rec:
            lm_forward_backward(chunks, batches, forward_only=True)
        records[mode] = rec

    def update(mode):
        chunks, session = variants[mode]
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        with session.replaying(records[mode].routes, predictor_loss=mode == "pr2"):
            lm_forward_backward(chunks, batches)
        session.metrics()

    times = {f"{kind}/{mode}": [] for kind in ("record", "update") for mode in variants}
    for rep in range(reps + 1):  # first round is warm-up
        for mode in variants:
            t_record = _timed(lambda m=mode: record(m))
            t_update = _timed(lambda m=mode: update(m))
            if rep:
                times[f"record/{mode}"].append(t_record)
                times[f"update/{mode}"].append(t_update)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cache = variants["pr2"][1].metrics()
    return {
        "shape": shape,
        "tokens": sum(b.tokens.numel() for b in batches),
        "medians": medians,
        "cache_tokens": cache["pr2/cache_tokens"],
        "cache_bytes": cache["pr2/cache_bytes"],
    }


def bench_accuracy(keep_fraction: float, rollouts: int = 150) -> float:
    """Predictor trained on a synthetic drift with a sampled cache, evaluated on all tokens."""
    import torch

    from megatron_pr2.models.gpt import LMBatch, TinyMoEShape, lm_forward_backward
    from megatron_pr2.predictor.module import predictor_parameters

    shape = TinyMoEShape(num_layers=1, hidden_size=64, num_moe_experts=16, moe_router_topk=2)
    chunks, session = _build("pr2", shape, cache_keep_fraction=keep_fraction)
    generator = torch.Generator().manual_seed(1)  # fresh batches every rollout, as in RL
    router = session._routers[1]
    start = router.weight.detach().clone()
    drift = 0.1 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(predictor_parameters(chunks), lr=2e-2)
    predictor_config = router.replay_config.predictor

    def rollout(train: bool) -> float:
        batches = [LMBatch.random(4, 64, shape.vocab_size, generator) for _ in range(8)]
        with torch.no_grad():
            router.weight.copy_(start)
        with torch.no_grad(), session.recording() as rec:
            lm_forward_backward(chunks, batches, forward_only=True)
        accuracy = float("nan")
        for step in range(2):
            with torch.no_grad():
                router.weight += drift
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            with session.replaying(rec.routes, predictor_loss=step >= 1):
                lm_forward_backward(chunks, batches)
            if step >= 1 and train:
                optimizer.step()
            metrics = session.metrics()
            accuracy = metrics.get("pr2/predictive_topk_accuracy", accuracy)
        return accuracy

    for _ in range(rollouts):
        rollout(train=True)
    predictor_config.cache_keep_fraction = 1.0  # evaluate on every token of a held-out batch
    return rollout(train=False)


def qwen3_cache_bytes_per_token(keep_fraction: float) -> tuple[float, float]:
    hidden, experts, layers = 2048, 128, 48
    unbounded = (hidden + experts) * 4 * layers
    sampled = keep_fraction * ((hidden + experts) * 2 + 8) * layers  # bf16 rows + int64 key
    return unbounded, sampled


def main() -> None:
    _setup()
    import megatron.core
    import torch

    overhead = bench_overhead()
    m = overhead["medians"]
    accuracy_sampled = bench_accuracy(0.03)
    accuracy_full = bench_accuracy(1.0)
    unbounded, sampled = qwen3_cache_bytes_per_token(0.03)
    tiny_bytes_per_token = overhead["cache_bytes"] / overhead["tokens"]
    shape = overhead["shape"]
    tiny_unbounded = (shape.hidden_size + shape.num_moe_experts) * 4 * shape.num_layers

    rows = [
        ("recording pass (forward-only)", m["record/r2"], m["record/pr2"], 1.03),
        ("update step (fwd+bwd, replay)", m["update/r2"], m["update/pr2"], 1.02),
    ]
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on a {os.cpu_count()}-core CPU "
        f"({platform.machine()}), torch {torch.__version__}, megatron-core "
        f"{megatron.core.__version__}, torch threads {torch.get_num_threads()}. Command: "
        "`.venv/bin/python bench/bench_predictor.py`. Model: 2 MoE layers, hidden "
        f"{shape.hidden_size}, {shape.num_moe_experts} experts (H/E = 16 as Qwen3-30B-A3B), top-"
        f"{shape.moe_router_topk}, {overhead['tokens']} tokens in 4 microbatches; r2 and pr2 "
        "interleaved, 7 rounds after a warm-up, medians.",
        "",
        "| pass | r2 (ms) | pr2 (ms) | pr2 / r2 | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, r2, pr2, target in rows:
        ratio = pr2 / r2
        lines.append(
            f"| {name} | {r2 * 1e3:.1f} | {pr2 * 1e3:.1f} | {ratio:.3f} | <= {target} | "
            f"{'yes' if ratio <= target else 'no'} |"
        )
    lines += [
        "",
        "| feature cache | bytes per token of the batch | vs unbounded fp32 |",
        "|---|---|---|",
        f"| Qwen3-30B-A3B unbounded fp32 (48 layers x (2048 + 128) x 4 B) | {unbounded:,.0f} | 1x |",
        f"| Qwen3-30B-A3B default: 3 % sampled, bf16, + int64 key | {sampled:,.0f} | "
        f"{unbounded / sampled:.0f}x less |",
        f"| this run's model, measured (`pr2/cache_bytes` / tokens) | {tiny_bytes_per_token:,.1f} | "
        f"{tiny_unbounded / tiny_bytes_per_token:.0f}x less |",
        "",
        "| synthetic drift, predictor trained 150 rollouts (fresh batches) | predictive top-k accuracy "
        "(every token of a held-out batch) |",
        "|---|---|",
        f"| unbounded cache (every token) | {accuracy_full:.4f} |",
        f"| sampled cache (3 %, bf16) | {accuracy_sampled:.4f} |",
        f"| difference | {100 * (accuracy_full - accuracy_sampled):+.2f} points (target: within 1) |",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    _write_section(section)


def _write_section(section: str) -> None:
    path = os.path.join(REPO_ROOT, "bench", "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        following = rest.find("\n## ")
        tail = rest[following + 1 :] if following >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
