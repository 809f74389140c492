"""On-device next-token sampling: the kept set of each knob, raw log-probs, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pr2.rl.sampling import SamplingParams, sample_next

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)


def draw(params: SamplingParams, seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_next(LOGITS, params, torch.Generator().manual_seed(seed), **kw)


def test_frequencies_follow_the_tempered_distribution():
    ids, _ = draw(SamplingParams(temperature=2.0))
    expected = torch.softmax(LOGITS[0] / 2.0, dim=0)
    observed = torch.bincount(ids, minlength=6).float() / len(ids)
    # 4000 draws: 4 standard errors of the largest share is about 0.03.
    assert torch.allclose(observed, expected, atol=0.03)


def test_top_k_then_top_p_keep_only_the_head():
    ids, _ = draw(SamplingParams(top_k=3))
    assert set(ids.tolist()) == {0, 1, 2}
    probs = torch.softmax(LOGITS[0], dim=0)
    # Nucleus 0.7: token 0 has ~0.57, so tokens 0 and 1 (mass above 1 is 0.57 < 0.7) stay.
    assert probs[0] < 0.7 < probs[0] + probs[1]
    ids, _ = draw(SamplingParams(top_p=0.7))
    assert set(ids.tolist()) == {0, 1}
    ids, _ = draw(SamplingParams(top_k=1))
    assert set(ids.tolist()) == {0}


def test_log_probs_are_raw_and_vocab_cut_is_respected():
    ids, raw = draw(SamplingParams(temperature=0.5, top_k=4), sample_vocab_size=3)
    assert int(ids.max()) < 3
    full = torch.log_softmax(LOGITS[0], dim=0)
    assert torch.allclose(raw, full[ids])
    assert math.isclose(float(raw[ids == 0][0]), float(full[0]), rel_tol=1e-6)


def test_same_generator_same_draws_and_greedy_draws_nothing():
    a, _ = draw(SamplingParams(top_p=0.9), seed=3)
    b, _ = draw(SamplingParams(top_p=0.9), seed=3)
    c, _ = draw(SamplingParams(top_p=0.9), seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sample_next(LOGITS, SamplingParams(top_k=1), g)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0)]
)
def test_bad_knobs_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
