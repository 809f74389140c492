"""The GRPO loop in multi-process layouts: every mode runs a few steps under PP2 x EP2 (world 4,
data parallel 2) and TP2 (sequence parallel) x PP2, and the engine-route modes under TP2 (sequence
parallel) x EP2, where the KV-cached engine serves a sequence-parallel trainer; with the checks
of the world-1 test."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.dist import Layout, init_layout

pytestmark = pytest.mark.slow

TINY = "examples/tiny/grpo_tiny.yaml"
ZERO_DEV = "train/router_replay/zero_deviation_ratio"


def _overrides(mode: str, layout: Layout, log_dir: str) -> list[str]:
    return [
        f"policy.router_replay.mode={mode}",
        f"logger.log_dir={log_dir}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        "grpo.max_num_steps=2",
        "grpo.sft_warmup_steps=2",
        "grpo.sft_batch_size=4",
        "grpo.num_prompts_per_step=2",
        "grpo.num_generations_per_prompt=4",
        "grpo.off_policy_steps=2",
        "policy.micro_batch_size=2",
        "generation.max_new_tokens=3",
        f"policy.tensor_model_parallel_size={layout.tp}",
        f"policy.pipeline_model_parallel_size={layout.pp}",
        f"policy.expert_model_parallel_size={layout.ep}",
    ]


def _check(mode: str, history: list[dict]) -> None:
    assert [m["step"] for m in history] == [1, 2]
    for metrics in history:
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        assert not bad, f"{mode}: non-finite metrics {bad}"
        assert 0.0 <= metrics["train/reward"] <= 1.0
        assert f"{ZERO_DEV}/mini_step_1" in metrics
        assert "train/loss/mini_step_1" in metrics and "train/grad_norm/mini_step_0" in metrics
        if mode in ("none", "r2"):
            assert metrics[f"{ZERO_DEV}/mini_step_0"] == 1.0, mode
        if mode in ("r3", "pr2_r3"):
            # the rollout-vs-training numerics gap (bf16 engine vs fp32 trainer), measured
            assert metrics["train/gen_kl_error/mini_step_0"] > 0.0
            assert metrics["train/token_mult_prob_error/mini_step_0"] != 1.0
            assert metrics["train/logprobs/router_replay/tokens"] > 0
        if mode in ("pr2", "pr2_r3"):
            assert "train/pr2/predictive_loss/mini_step_1" in metrics


def _run_layouts(rank: int, world: int, tmp: str, cases: list[tuple[Layout, list[str]]]) -> None:
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train

    for layout, modes in cases:
        init_layout(layout)
        for mode in modes:
            history = train(
                load_config(TINY, _overrides(mode, layout, f"{tmp}/{layout.name}-{mode}"))
            )
            _check(mode, history)
            # every rank returns the same history (rank 0 logs it)
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, [m["train/reward"] for m in history])
            assert all(g == gathered[0] for g in gathered), (layout.name, mode, gathered)


def test_every_mode_under_pp2_ep2_and_tp2_sp_pp2(run_dist, tmp_path):
    cases = [
        (Layout(pp=2, ep=2), ["none", "r2", "r3", "pr2", "pr2_r3"]),
        (Layout(tp=2, pp=2), ["r2", "pr2"]),
        (Layout(tp=2, ep=2), ["r3", "pr2_r3"]),
    ]
    run_dist(_run_layouts, 4, str(tmp_path), cases)


# ---------------------------------------------------------------------- worker vs world 1
def _random_batch(vocab: int, pad_id: int):
    from megatron_pr2.rl.worker import RLBatch

    gen = torch.Generator().manual_seed(7)
    batch, seq, prompt = 8, 12, 4
    lengths = torch.randint(prompt + 2, seq + 1, (batch,), generator=gen)
    tokens = torch.randint(1, vocab, (batch, seq), generator=gen)
    positions = torch.arange(seq).unsqueeze(0)
    tokens = torch.where(positions < lengths[:, None], tokens, torch.full_like(tokens, pad_id))
    mask = ((positions >= prompt) & (positions < lengths[:, None])).float()
    advantages = torch.randn(batch, generator=gen)
    return RLBatch(tokens, lengths, mask, advantages, pad_id=pad_id)


def _layout_free_init(chunks, num_experts: int) -> None:
    """Weights that depend only on the parameter's global name (megatron's init draws expert
    weights from a per-EP-rank RNG stream, so EP layouts would start from other weights)."""
    import re
    import zlib

    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = num_experts // parallel_state.get_expert_model_parallel_world_size()

    def global_name(name: str) -> str:
        return re.sub(
            r"local_experts\.(\d+)", lambda m: f"experts.{ep_rank * local + int(m[1])}", name
        )

    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(global_name(name).encode()))
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def _worker_run(mode: str) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Old log-probs and (loss, grad norm) of two mini-steps on a fixed batch."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import TinyMoEShape, build_model_chunks, moe_transformer_config
    from megatron_pr2.rl.loss import ClippedPGLossFn
    from megatron_pr2.rl.worker import PolicyWorker

    shape = TinyMoEShape(num_layers=2, vocab_size=24, max_sequence_length=16)
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    replay = RouterReplayConfig(mode=mode, metrics_token_stride=1)
    chunks = build_model_chunks(moe_transformer_config(shape), 24, 16, replay)
    _layout_free_init(chunks, shape.num_moe_experts)
    worker = PolicyWorker(chunks, replay, lr=1e-2, micro_batch_size=2)
    batch = _random_batch(24, pad_id=0)
    batch.prev_logprobs = worker.get_logprobs(batch)
    steps = worker.train(batch, ClippedPGLossFn(), num_mini_steps=2)
    return batch.prev_logprobs, [(s["train/loss"], s["train/grad_norm"]) for s in steps]


def _compare_with_reference(rank: int, world: int, reference: dict, layouts: list[Layout]):
    for layout in layouts:
        init_layout(layout)
        for mode, (ref_logprobs, ref_steps) in reference.items():
            logprobs, steps = _worker_run(mode)
            assert torch.allclose(logprobs, ref_logprobs, atol=1e-5), (layout.name, mode)
            for i, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(steps, ref_steps)):
                assert math.isclose(loss, ref_loss, rel_tol=1e-4, abs_tol=1e-6), (
                    layout.name,
                    mode,
                    i,
                    loss,
                    ref_loss,
                )
                assert math.isclose(norm, ref_norm, rel_tol=1e-4), (
                    layout.name,
                    mode,
                    i,
                    norm,
                    ref_norm,
                )


def test_data_parallel_worker_matches_world1(world1, run_dist):
    """Old log-probs (gathered over DP in batch order), the mini-batch loss and the gradient
    norm of each mini-step equal world 1's under DP2 and DP2 x EP2: loss denominators count
    every DP rank's tokens and the DDP average is undone, so the summed gradient is world 1's."""
    reference = {mode: _worker_run(mode) for mode in ("r2", "none")}
    run_dist(_compare_with_reference, 2, reference, [Layout(), Layout(ep=2)])
