"""Router drift probe (rl.drift): the cosine measures, the file format, the analysis section and
a trainer run with the probe on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_pr2.rl.drift import (
    DriftStep,
    change_cosines,
    cosine,
    drift_path,
    drift_stats,
    load_drift,
    read_drift_step,
    step_metrics,
    write_drift_step,
)

TOKENS, EXPERTS = 256, 8


def _walk(steps: int, direction: float, generator: torch.Generator) -> torch.Tensor:
    """Logits ``[steps + 1, T, E]``: each change = ``direction`` * a fixed drift + fresh noise."""
    drift = torch.randn(TOKENS, EXPERTS, generator=generator)
    changes = [
        direction * drift + torch.randn(TOKENS, EXPERTS, generator=generator) for _ in range(steps)
    ]
    start = torch.randn(TOKENS, EXPERTS, generator=generator)
    return torch.cat([start[None], start + torch.cumsum(torch.stack(changes), 0)])


def test_cosine_is_one_for_a_constant_direction_and_zero_for_independent_noise():
    g = torch.Generator().manual_seed(0)
    systematic = change_cosines(_walk(40, direction=20.0, generator=g))
    noise = change_cosines(_walk(40, direction=0.0, generator=g))
    assert min(systematic) > 0.99
    # independent changes: mean ~0, each within a few 1/sqrt(T * (E - 1)) of it
    assert abs(sum(noise) / len(noise)) < 0.02
    assert max(abs(c) for c in noise) < 5 / math.sqrt(TOKENS * (EXPERTS - 1))
    # half signal, half noise (equal variance per change): cos ~ 1/2
    half = change_cosines(_walk(40, direction=1.0, generator=g))
    assert abs(sum(half) / len(half) - 0.5) < 0.05
    # later lags keep the direction too
    assert min(change_cosines(_walk(10, 20.0, g), lag=3)) > 0.99


def test_a_shift_shared_by_all_experts_is_not_drift():
    """Routing ignores a per-token shift of all of a token's logits: large random shifts on top
    of a small systematic drift leave the measured cosine at ~1."""
    g = torch.Generator().manual_seed(1)
    drift = torch.randn(TOKENS, EXPERTS, generator=g, dtype=torch.float64)
    shifts = 100 * torch.randn(6, TOKENS, 1, generator=g, dtype=torch.float64)
    changes = drift + shifts.expand(6, TOKENS, EXPERTS)
    points = torch.cat([torch.zeros(1, TOKENS, EXPERTS, dtype=torch.float64), changes.cumsum(0)])
    assert min(change_cosines(points)) > 0.999
    assert math.isnan(cosine(torch.zeros(3), torch.ones(3)))


def _records(points: torch.Tensor, updates: int, first_step: int = 1) -> list[DriftStep]:
    """Cut one layer's logits sequence into steps of ``updates`` updates (point 0 of a step is
    the last point of the step before)."""
    keys = torch.arange(points.shape[1], dtype=torch.int64)
    out = []
    for i, start in enumerate(range(0, points.shape[0] - 1, updates)):
        out.append(
            DriftStep(
                step=first_step + i,
                probe_step=first_step,
                keys=keys,
                logits={3: points[start : start + updates + 1]},
                update_cosine={3: torch.full((updates,), 0.5)},
                grad_cosine={3: torch.full((updates,), 0.25)},
                update_norm={3: torch.full((updates,), 1e-3)},
                adam_beta1=0.9,
            )
        )
    return out


def test_analysis_joins_steps_and_matches_the_per_step_metrics():
    g = torch.Generator().manual_seed(2)
    points = _walk(12, direction=1.0, generator=g)
    records = _records(points, updates=3)
    stats = drift_stats(records)[3]
    want = change_cosines(points)  # the run as one sequence: 11 lag-1 pairs
    assert stats.logit[1] == pytest.approx(want, rel=1e-12)
    assert stats.logit[2] == pytest.approx(change_cosines(points, lag=2), rel=1e-12)
    # pairs whose later change is a step's first update: changes 3, 6, 9
    assert stats.across_steps == pytest.approx([want[2], want[5], want[8]], rel=1e-12)
    assert len(stats.within_step) == 8
    # metrics.jsonl's per-step value: the mean of the pairs ending in that step
    previous: dict[int, torch.Tensor] = {}
    for i, record in enumerate(records):
        metrics = step_metrics(record, previous)
        pairs = want[max(0, 3 * i - 1) : 3 * i + 2]
        assert metrics["drift/logit_change_cosine"] == pytest.approx(sum(pairs) / len(pairs))
        assert metrics["drift/router_update_cosine"] == 0.5
        assert metrics["drift/router_grad_cosine"] == 0.25
        previous = {3: record.logits[3][-1] - record.logits[3][-2]}
    # a missing step or another probe starts a new sequence: no pair spans the gap
    gap = records[:2] + records[3:]
    assert len(drift_stats(gap)[3].logit[1]) == 5 + 2
    for record in records[2:]:  # a resumed run picks a new probe
        record.probe_step = 3
    assert len(drift_stats(records)[3].logit[1]) == 5 + 5


def test_drift_file_round_trip_and_bad_files(tmp_path):
    record = _records(_walk(4, 1.0, torch.Generator().manual_seed(3)), updates=2)[1]
    path = drift_path(tmp_path, record.step)
    write_drift_step(path, record)
    back = read_drift_step(path)
    assert (back.step, back.probe_step, back.num_updates, back.adam_beta1) == (2, 1, 2, 0.9)
    assert torch.equal(back.logits[3], record.logits[3].float())
    assert torch.equal(back.grad_cosine[3], record.grad_cosine[3])
    assert [r.step for r in load_drift(tmp_path)] == [2]
    assert not list(tmp_path.glob("drift/*.tmp"))

    from safetensors.torch import save_file

    meta = {"format": "pr2-drift-probe", "version": "1", "step": "1", "probe_step": "1"}
    save_file({"keys": torch.zeros(2, dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="metadata key 'num_updates' missing"):
        read_drift_step(path)
    meta |= {"num_updates": "2", "adam_beta1": "0.9"}
    save_file(
        {"keys": torch.zeros(2, dtype=torch.int64), "layer_1/logits": torch.zeros(2, 2, 8)},
        str(path),
        metadata=meta,
    )
    with pytest.raises(ValueError, match=r"layer_1/logits has shape \(2, 2, 8\)"):
        read_drift_step(path)
    save_file({"keys": torch.zeros(2, dtype=torch.int64), "w": torch.zeros(1)}, str(path), meta)
    with pytest.raises(ValueError, match="unexpected tensor 'w'"):
        read_drift_step(path)


def test_analyze_reports_the_drift_section_without_route_traces(tmp_path):
    from megatron_pr2.rl.analyze import analyze_run

    for record in _records(_walk(8, 20.0, torch.Generator().manual_seed(4)), updates=4):
        write_drift_step(drift_path(tmp_path, record.step), record)
    report, figures = analyze_run(tmp_path)
    text = report.read_text()
    assert "## Router drift structure (drift probe)" in text
    all_row = next(line for line in text.splitlines() if line.startswith("| all |"))
    cells = [c.strip() for c in all_row.split("|")[2:-1]]
    assert all(float(c) > 0.99 for c in cells[:6])  # lags 1-4, within, across
    assert cells[6:9] == ["0.500", "0.250", "1.00e-03"]
    assert [p.name for p in figures] == ["drift_cosine.png"]
    assert figures[0].stat().st_size > 5000


def test_trainer_probe_writes_files_and_metrics_and_leaves_training_unchanged(world1, tmp_path):
    """A tiny run with the probe on: per-step files, drift/* metrics, the report section; and
    the same training metrics as without the probe (it only reads the model)."""
    from megatron_pr2.rl.analyze import analyze_run
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train

    def run(log_dir, probe: int) -> list[dict]:
        overrides = [
            "policy.router_replay.mode=r2",
            f"logger.log_dir={log_dir}",
            f"logger.drift_probe_tokens={probe}",
            "logger.tensorboard_enabled=false",
            "logger.progress_bar=false",
            "grpo.max_num_steps=2",
            "grpo.sft_warmup_steps=20",
            "grpo.sft_batch_size=16",
            "grpo.num_prompts_per_step=4",
            "grpo.off_policy_steps=2",
            "policy.micro_batch_size=2",
            "task.partial_credit=0.5",  # every mini-batch has reward spread: nonzero gradients
        ]
        return train(load_config("examples/tiny/grpo_tiny.yaml", overrides))

    with_probe = run(tmp_path / "probe", 20)
    without = run(tmp_path / "plain", 0)

    def training(history: list[dict]) -> list[dict]:
        return [
            {k: v for k, v in m.items() if not k.startswith(("timing/", "drift/"))} for m in history
        ]

    assert json.dumps(training(with_probe)) == json.dumps(training(without))
    assert not any(k.startswith("drift/") for m in without for k in m)
    assert not (tmp_path / "plain" / "drift").exists()
    records = load_drift(tmp_path / "probe")
    assert [r.step for r in records] == [1, 2]
    for record in records:
        assert record.probe_step == 1 and record.layers == [1, 2] and record.num_updates == 2
        assert record.keys.shape == (20,) and bool((record.keys >= 0).all())
        assert all(v.shape == (3, 20, 8) for v in record.logits.values())
        assert all(bool((n > 0).all()) for n in record.update_norm.values())
    # a step's starting point is the previous step's last one
    assert torch.equal(records[1].logits[1][0], records[0].logits[1][-1])
    for metrics in with_probe:
        assert math.isfinite(metrics["drift/logit_change_cosine"])
        assert metrics["drift/router_update_norm"] > 0
    report, _ = analyze_run(tmp_path / "probe")
    assert "## Router drift structure (drift probe)" in report.read_text()


def test_negative_probe_size_is_refused():
    from megatron_pr2.errors import ConfigError
    from megatron_pr2.rl.config import load_config

    with pytest.raises(ConfigError, match="drift_probe_tokens must be >= 0"):
        load_config("examples/tiny/grpo_tiny.yaml", ["logger.drift_probe_tokens=-1"])
    assert load_config("examples/tiny/grpo_tiny.yaml").logger.drift_probe_tokens == 0
