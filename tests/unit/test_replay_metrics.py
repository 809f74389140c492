"""The replay-metric counters against a brute-force count over Python sets."""

import pytest
import torch

from megatron_pr2.replay import metrics


def random_routes(tokens: int, experts: int, topk: int, generator: torch.Generator):
    return torch.stack([torch.randperm(experts, generator=generator)[:topk] for _ in range(tokens)])


def brute_force(calls, topk):
    tokens = overlap = fallback = 0
    deviation = [0, 0, 0, 0]
    for replayed, live, fallback_rows, padding_rows in calls:
        for row in range(replayed.shape[0]):
            if padding_rows is not None and padding_rows[row]:
                continue
            if fallback_rows is not None and fallback_rows[row]:
                fallback += 1
                continue
            shared = len(set(replayed[row].tolist()) & set(live[row].tolist()))
            tokens += 1
            overlap += shared
            deviation[min(topk - shared, 3)] += 1
    return tokens, overlap, deviation, fallback


@pytest.mark.parametrize("topk", [1, 2, 4, 8])
def test_counters_match_set_intersections(topk):
    generator = torch.Generator().manual_seed(topk)
    experts, calls = 16, []
    counters = metrics.new_counters(topk)
    for call in range(4):
        tokens = 37 + call
        live = random_routes(tokens, experts, topk, generator)
        replayed = live.clone()
        swap = torch.rand(tokens, generator=generator) < 0.5  # about half the rows differ
        replayed[swap] = random_routes(int(swap.sum()), experts, topk, generator)
        fallback = torch.rand(tokens, generator=generator) < 0.2 if call % 2 else None
        padding = torch.rand(tokens, generator=generator) < 0.2 if call >= 2 else None
        if fallback is not None:
            replayed[fallback] = live[fallback]
        metrics.accumulate(counters, replayed, live, fallback, padding)
        calls.append((replayed, live, fallback, padding))

    tokens, overlap, deviation, fallback = brute_force(calls, topk)
    n = metrics.counts(counters, topk)
    assert (n["tokens"], n["overlap"], n["fallback"]) == (tokens, overlap, fallback)
    assert [n["dev0"], n["dev1"], n["dev2"], n["dev_ge3"]] == deviation
    summary = metrics.summarize({3: counters}, topk)
    assert summary["router_replay/replay_agreement/layer_3"] == pytest.approx(
        overlap / (tokens * topk)
    )
    assert summary["router_replay/zero_deviation_ratio"] == pytest.approx(deviation[0] / tokens)
    assert summary["router_replay/fallback_tokens"] == fallback


def test_summarize_sums_layers_before_ratios():
    a, b = metrics.new_counters(2), metrics.new_counters(2)
    a[2] = 3  # 3 tokens, full overlap
    b[0] = 1  # 1 token, no overlap
    summary = metrics.summarize({1: a, 2: b}, topk=2)
    assert summary["router_replay/zero_deviation_ratio"] == pytest.approx(3 / 4)
    assert summary["router_replay/topk_deviation_2/layer_2"] == 1.0
    assert summary["router_replay/tokens"] == 4


def test_a_layer_with_only_fallback_rows_reports_its_count_but_no_agreement():
    """All-fallback layers still count their fallback tokens, and report no ratio (there is no
    replayed row to compare), instead of an agreement of 0."""
    only_fallback, measured = metrics.new_counters(2), metrics.new_counters(2)
    only_fallback[-1] = 5
    measured[2] = 4  # 4 tokens, full overlap
    summary = metrics.summarize({1: only_fallback, 2: measured}, topk=2)
    assert summary["router_replay/fallback_tokens/layer_1"] == 5
    assert summary["router_replay/tokens/layer_1"] == 0
    assert "router_replay/replay_agreement/layer_1" not in summary
    assert summary["router_replay/replay_agreement/layer_2"] == 1.0
    assert summary["router_replay/replay_agreement"] == 1.0  # totals: 4 measured tokens
    assert summary["router_replay/fallback_tokens"] == 5
