"""Route traces (format, validation), `pr2 analyze` statistics and `pr2 compare` tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_pr2.replay.session import RouteTrace
from megatron_pr2.rl.analyze import analyze_run, horizon_stats, join_by_key
from megatron_pr2.rl.compare import compare_runs
from megatron_pr2.rl.traces import StepTrace, read_step_trace, trace_path, write_step_trace


def _routes(keys, used, live) -> RouteTrace:
    return RouteTrace(torch.tensor(keys), torch.tensor(used), torch.tensor(live))


def _trace(step: int = 1) -> StepTrace:
    old = _routes([1, 2, 3], [[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 6], [4, 5]])
    # mini-step 0 sees tokens 3 and 1 (and a padding token, key -5); mini-step 1 sees token 2
    mini0 = _routes([3, 1, -5], [[4, 5], [0, 1], [7, 6]], [[5, 4], [0, 2], [1, 2]])
    mini1 = _routes([2], [[2, 3]], [[3, 6]])
    return StepTrace(
        step=step,
        mode="pr2",
        topk=2,
        num_experts=8,
        num_mini_steps=2,
        token_stride=1,
        old={4: old},
        mini_steps=[{4: mini0}, {4: mini1}],
        router_drift={4: 0.125},
    )


def test_trace_file_round_trip(tmp_path):
    path = trace_path(tmp_path, 7)
    write_step_trace(path, _trace(7))
    back = read_step_trace(path)
    assert (back.step, back.mode, back.topk, back.num_mini_steps) == (7, "pr2", 2, 2)
    assert back.router_drift == {4: 0.125}
    assert torch.equal(back.old[4].used, torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert torch.equal(back.mini_steps[1][4].live, torch.tensor([[3, 6]]))
    assert not list(tmp_path.glob("traces/*.tmp"))


def test_bad_trace_files_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file(
        {"layer_1/old/keys": torch.zeros(2, dtype=torch.int64)}, str(path), metadata={"format": "x"}
    )
    with pytest.raises(ValueError, match="metadata key 'version' missing"):
        read_step_trace(path)
    write_step_trace(path, _trace())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_step_trace(path)
    meta = {
        k: "1" for k in ("version", "step", "topk", "num_experts", "num_mini_steps", "token_stride")
    }
    meta |= {"format": "pr2-route-trace", "mode": "r2"}
    save_file({"layer_1/old/keys": torch.zeros(2, dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"layer_1/old lacks \['live', 'used'\]"):
        read_step_trace(path)
    save_file({"router/weights": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="unexpected tensor 'router/weights'"):
        read_step_trace(path)


def test_join_by_key_skips_padding_and_unknown_tokens():
    old = _routes([10, 20, 30], [[0, 1]] * 3, [[0, 1]] * 3)
    later = _routes([30, -1, 10, 99], [[0, 1]] * 4, [[0, 1]] * 4)
    old_rows, later_rows = join_by_key(old, later)
    assert old_rows.tolist() == [2, 0] and later_rows.tolist() == [0, 2]


def test_horizon_stats_by_hand():
    stats = horizon_stats([_trace()])
    # horizon 0, tokens 3 and 1: recorded {4,5} vs live {5,4} -> 2/2; {0,1} vs {0,2} -> 1/2
    rec0 = stats["recorded"][(4, 0)]
    assert (rec0.tokens, rec0.agreement, rec0.zero_deviation) == (2, 0.75, 0.5)
    # stale: old live {4,5} vs {5,4}; {0,1} vs {0,2} -> the same numbers here
    assert stats["stale"][(4, 0)].agreement == 0.75
    # horizon 1, token 2: recorded {2,3} vs live {3,6} -> 1/2; stale {2,6} vs {3,6} -> 1/2
    assert stats["recorded"][(4, 1)].agreement == 0.5
    assert stats["stale"][(4, 1)].zero_deviation == 0.0
    # replayed (within the update pass), padding excluded: {4,5}/{5,4} equal, {0,1}/{0,2} not
    assert stats["replayed"][(4, 0)].zero_deviation == 0.5


def test_analyze_writes_report_and_figures(tmp_path):
    for step in (1, 2):
        write_step_trace(trace_path(tmp_path, step), _trace(step))
    report, figures = analyze_run(tmp_path)
    text = report.read_text()
    assert "| 0 | 4 | 0.7500 | 0.5000 | 0.7500 | 0.5000 | 0.5000 |" in text
    assert "1.25e-01" in text  # router drift of layer 4
    assert all(p.stat().st_size > 1000 for p in figures)
    with pytest.raises(FileNotFoundError, match="route_traces=true"):
        analyze_run(tmp_path / "nothing")


def _fake_run(
    path, mode: str, rewards: list[float], zero_dev: list[list[float]], val: dict | None = None
) -> None:
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"policy": {"router_replay": {"mode": mode}}, "grpo": {"off_policy_steps": 2}})
    )
    with (path / "metrics.jsonl").open("w") as f:
        for step, (r, zd) in enumerate(zip(rewards, zero_dev), start=1):
            record = {"step": step, "train/reward": r, "train/probs_ratio_std": 0.1 * step}
            for i, value in enumerate(zd):
                record[f"train/router_replay/zero_deviation_ratio/mini_step_{i}"] = value
            if val and step in val:
                record["validation/accuracy"] = val[step]
            f.write(json.dumps(record) + "\n")


def test_compare_groups_seeds_and_writes_table_and_figure(tmp_path):
    rewards = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    _fake_run(tmp_path / "a", "r2", rewards, [[1.0, 0.9]] * 7)
    _fake_run(tmp_path / "b", "r2", [r + 0.2 for r in rewards], [[1.0, 0.7]] * 7)
    _fake_run(tmp_path / "c", "none", rewards, [[1.0, 0.5]] * 7, val={3: 0.25, 6: 0.75})
    table, figure = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out")
    text = table.read_text()
    # final reward = mean of the last 5 steps: 0.4 (run a) and 0.6 (run b) -> 0.5 ± 0.1414
    assert "| none | 1 | 0.4000 |" in text
    assert "val. accuracy |" in text
    none_row = next(line for line in text.splitlines() if line.startswith("| none | 1 |"))
    assert none_row.endswith("| 0.7500 |")  # the last validation, not the mean of both
    assert "| r2 | 2 | 0.5000 ± 0.1414 |" in text
    assert "| r2 | 1.0000 ± 0.0000 | 0.8000 ± 0.1414 |" in text
    assert text.index("| none |") < text.index("| r2 |")
    assert figure.stat().st_size > 5000


def test_traces_agree_with_the_replay_metrics(world1, tmp_path):
    """The trainer's traces and its replay metrics measure the same thing (stride 1)."""
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import train

    overrides = [
        "policy.router_replay.mode=pr2",
        f"logger.log_dir={tmp_path}",
        "logger.route_traces=true",
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
    history = train(load_config("examples/tiny/grpo_tiny.yaml", overrides))
    for metrics in history:
        trace = read_step_trace(trace_path(tmp_path, metrics["step"]))
        stats = horizon_stats([trace])
        for i in range(2):
            cells = [c for (layer, h), c in stats["replayed"].items() if h == i]
            equal, tokens = sum(c.equal for c in cells), sum(c.tokens for c in cells)
            want = metrics[f"train/router_replay/zero_deviation_ratio/mini_step_{i}"]
            assert math.isclose(equal / tokens, want, rel_tol=1e-9)
        assert set(trace.router_drift) == {1, 2} and all(d > 0 for d in trace.router_drift.values())
    report, _ = analyze_run(tmp_path)
    assert "mode `pr2`, 2 steps" in report.read_text()
