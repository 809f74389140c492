"""ClippedPGLossFn against hand-computed numbers on tiny explicit tensors.

Ratios are set exactly by choosing ``logprobs = prev_logprobs + log(r)``, so every expected value
below is written out by hand from min(r·A, clip(r)·A) and friends.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pr2.rl.loss import (
    METRIC_REDUCTIONS,
    ClippedPGLossConfig,
    ClippedPGLossFn,
    kl_estimate,
)

F64 = torch.float64
LOG2 = math.log(2.0)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def make_batch(ratios, adv, *, prev=None, weights=None, token_mask=None, sample_mask=None):
    """logprobs with requires_grad and a data dict; ``weights`` sets π_old / μ per token."""
    r = t(ratios)
    prev_t = torch.full_like(r, math.log(0.5)) if prev is None else t(prev)
    lp = (prev_t + torch.log(r)).clone().requires_grad_(True)
    gen = prev_t.clone() if weights is None else prev_t - torch.log(t(weights))
    data = {
        "prev_logprobs": prev_t,
        "generation_logprobs": gen,
        "advantages": t(adv),
        "token_mask": torch.ones_like(r) if token_mask is None else t(token_mask),
    }
    if sample_mask is not None:
        data["sample_mask"] = t(sample_mask)
    return lp, data


def approx(x, rel=1e-9, abs=1e-12):
    return pytest.approx(x, rel=rel, abs=abs)


def f(x) -> float:
    return float(x)


# ---------------------------------------------------------------------------------------------
# PPO clip
# ---------------------------------------------------------------------------------------------


def test_plain_ppo_clip_values_and_metrics():
    fn = ClippedPGLossFn(ClippedPGLossConfig(ratio_clip_min=0.2, ratio_clip_max=0.2))
    # Row 0: A = +1, row 1: A = -1 (per-sample advantages broadcast to tokens).
    lp, data = make_batch([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], [1.0, -1.0])
    loss, m = fn(lp, data)
    # A=+1: -min(r, clip r) = [-0.5, -1, -1.2]; A=-1: max(r, clip r) = [0.8, 1, 1.5]
    expected = (-0.5 - 1.0 - 1.2 + 0.8 + 1.0 + 1.5) / 6
    assert f(loss) == approx(expected)
    assert f(m["loss"]) == approx(expected)
    assert f(m["probs_ratio"]) == approx(1.0)
    assert f(m["probs_ratio_clamped"]) == approx((0.8 + 1.0 + 1.2) * 2 / 6)
    assert f(m["probs_ratio_min"]) == approx(0.5)
    assert f(m["probs_ratio_max"]) == approx(1.5)
    assert f(m["probs_ratio_std"]) == approx(math.sqrt((0.25 + 0.0 + 0.25) / 3))
    # Only (A<0, r=0.5) is clipped low, only (A>0, r=1.5) clipped high.
    assert f(m["clip_fraction_low"]) == approx(1 / 6)
    assert f(m["clip_fraction_high"]) == approx(1 / 6)
    # lp = log(0.5 r): entropy estimate = mean(-log(0.25), -log(0.5), -log(0.75)).
    ent = -(math.log(0.25) + math.log(0.5) + math.log(0.75)) / 3
    assert f(m["approx_entropy"]) == approx(ent)
    # policy KL (k3 of log r): r - 1 - log r.
    k3 = [0.5 - 1 - math.log(0.5), 0.0, 1.5 - 1 - math.log(1.5)]
    assert f(m["policy_kl_error"]) == approx(2 * sum(k3) / 6)
    # No train/inference mismatch: weights 1, error metrics neutral.
    assert f(m["token_mult_prob_error"]) == approx(1.0)
    assert f(m["gen_kl_error"]) == approx(0.0)
    assert f(m["js_divergence_error"]) == approx(0.0)
    assert f(m["sampling_importance_ratio"]) == approx(1.0)
    assert f(m["is_oob_ratio"]) == 0.0
    assert f(m["kl_penalty"]) == 0.0
    assert f(m["num_valid_samples"]) == 2.0
    assert set(m) == set(METRIC_REDUCTIONS)


def test_ppo_gradient_zero_where_clipped():
    fn = ClippedPGLossFn(ClippedPGLossConfig(ratio_clip_min=0.2, ratio_clip_max=0.2))
    lp, data = make_batch([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], [1.0, -1.0])
    loss, _ = fn(lp, data)
    loss.backward()
    # d(-A r)/d lp = -A r, over 6 tokens; clipped tokens (r=1.5 with A>0, r=0.5 with A<0): 0.
    expected = [[-0.5 / 6, -1.0 / 6, 0.0], [0.0, 1.0 / 6, 1.5 / 6]]
    torch.testing.assert_close(lp.grad, t(expected))


def test_clip_higher_asymmetry():
    ratios, adv = [[1.5, 0.5, 1.25]], [[1.0, -1.0, 1.0]]
    lp, data = make_batch(ratios, adv)
    asym, m_asym = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.28))(lp, data)
    sym, m_sym = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.2))(lp, data)
    # Upper bound 1.28: 1.5 -> 1.28, 1.25 stays; lower bound 0.8 for A<0: 0.5 -> 0.8.
    assert f(asym) == approx((-1.28 + 0.8 - 1.25) / 3)
    assert f(sym) == approx((-1.2 + 0.8 - 1.2) / 3)
    assert f(m_asym["clip_fraction_high"]) == approx(1 / 3)
    assert f(m_sym["clip_fraction_high"]) == approx(2 / 3)
    assert f(m_asym["clip_fraction_low"]) == approx(1 / 3)


def test_dual_clip_caps_negative_advantages():
    cfg = ClippedPGLossConfig(0.2, 0.28, ratio_clip_c=3.0)
    lp, data = make_batch([[5.0, 2.0, 0.5], [5.0, 1.0, 1.0]], [-1.0, 1.0])
    loss, _ = ClippedPGLossFn(cfg)(lp, data)
    # A=-1: max(r, clip r) = [5, 2, 0.8], then min(., c=3) = [3, 2, 0.8].
    # A=+1: untouched by dual clip: [-1.28, -1, -1].
    assert f(loss) == approx((3.0 + 2.0 + 0.8 - 1.28 - 1.0 - 1.0) / 6)
    loss.backward()
    assert f(lp.grad[0, 0]) == 0.0  # dual-clipped: constant
    assert f(lp.grad[0, 1]) == approx(2.0 / 6)  # d(-A r) = r
    no_dual, _ = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.28))(lp, data)
    assert f(no_dual) == approx((5.0 + 2.0 + 0.8 - 1.28 - 1.0 - 1.0) / 6)


def test_disable_ppo_ratio_is_reinforce():
    cfg = ClippedPGLossConfig(disable_ppo_ratio=True)
    lp, data = make_batch([[4.0, 1.0]], [[2.0, -1.0]], prev=[[0.0, 0.0]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    # -A log π: lp = [log 4, 0] -> -(2 log 4 + 0) / 2 = -2 log 2
    assert f(loss) == approx(-2 * LOG2)
    assert f(m["probs_ratio"]) == approx(2.5)  # still reported
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-1.0, 0.5]]))


# ---------------------------------------------------------------------------------------------
# Token-level vs sequence-level, GSPO
# ---------------------------------------------------------------------------------------------


def test_token_vs_sequence_level_reduction():
    ratios = [[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]]
    mask = [[1, 0, 0], [1, 1, 1]]
    lp, data = make_batch(ratios, [1.0, 1.0], token_mask=mask)
    tok, _ = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.28))(lp, data)
    seq, _ = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.28, token_level_loss=False))(lp, data)
    # Per-token losses: row 0 [-1.28], row 1 [-1, -1, -1].
    assert f(tok) == approx((-1.28 - 3.0) / 4)
    assert f(seq) == approx((-1.28 + -1.0) / 2)


def test_gspo_sequence_ratio():
    cfg = ClippedPGLossConfig(
        0.2, 0.28, token_level_loss=False, sequence_level_importance_ratios=True
    )
    # Seq 0 log-ratios (log 2, -log 2): mean 0 -> ratio 1. Seq 1 (log 4, 0): mean log 2 -> 2.
    lp, data = make_batch([[2.0, 0.5], [4.0, 1.0]], [1.0, 1.0])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    assert f(loss) == approx((-1.0 + -1.28) / 2)
    assert f(m["probs_ratio"]) == approx((1 + 1 + 2 + 2) / 4)
    assert f(m["probs_ratio_clamped"]) == approx((1 + 1 + 1.28 + 1.28) / 4)
    assert f(m["clip_fraction_high"]) == approx(2 / 4)
    loss.backward()
    # Seq 0: d(-exp(mean log r))/d lp_t = -1 * 1/2 per token, / 2 sequences. Seq 1 clipped: 0.
    torch.testing.assert_close(lp.grad, t([[-0.25, -0.25], [0.0, 0.0]]))


def test_gspo_requires_sequence_level_loss():
    with pytest.raises(ValueError, match="token_level_loss"):
        ClippedPGLossConfig(sequence_level_importance_ratios=True)


# ---------------------------------------------------------------------------------------------
# Importance-sampling correction
# ---------------------------------------------------------------------------------------------


def test_is_correction_untruncated_and_mismatch_metrics():
    cfg = ClippedPGLossConfig(use_importance_sampling_correction=True)
    lp, data = make_batch([[1.0, 1.0]], [1.0], weights=[[2.0, 0.5]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    assert f(loss) == approx(-(2.0 + 0.5) / 2)
    assert f(m["sampling_importance_ratio"]) == approx(1.25)
    assert f(m["token_mult_prob_error"]) == approx(2.0)  # exp|log 2| = 2 for both tokens
    # k3(log w) = w - 1 - log w: (1 - log 2) + (log 2 - 0.5) = 0.5, mean 0.25
    assert f(m["gen_kl_error"]) == approx(0.25)
    # JS term f(w) = ½[w log(2w/(1+w)) + log(2/(1+w))]
    js2 = 0.5 * (2 * math.log(4 / 3) + math.log(2 / 3))
    js05 = 0.5 * (0.5 * math.log(1 / 1.5) + math.log(2 / 1.5))
    assert f(m["js_divergence_error"]) == approx((js2 + js05) / 2)
    assert f(m["js_divergence_error"]) > 0
    assert f(m["is_oob_ratio"]) == 0.0


def test_tis_truncation():
    cfg = ClippedPGLossConfig(
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="tis",
        truncated_importance_sampling_ratio=2.0,
    )
    lp, data = make_batch([[1.0, 1.0, 1.0]], [1.0], weights=[[0.5, 1.0, 4.0]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    assert f(loss) == approx(-(0.5 + 1.0 + 2.0) / 3)
    assert f(m["sampling_importance_ratio"]) == approx(3.5 / 3)
    assert f(m["is_oob_ratio"]) == approx(1 / 3)
    assert f(m["token_mult_prob_error"]) == approx((2.0 + 1.0 + 4.0) / 3)
    assert f(m["gen_kl_error"]) == approx(((LOG2 - 0.5) + 0.0 + (3.0 - 2 * LOG2)) / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-0.5 / 3, -1.0 / 3, -2.0 / 3]]))


def test_icepop_masks_both_sides():
    cfg = ClippedPGLossConfig(
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="icepop",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.5,
    )
    lp, data = make_batch([[1.0] * 4], [1.0], weights=[[0.25, 1.0, 1.5, 4.0]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    # 0.25 and 4.0 are outside [0.5, 2] -> weight 0; denominator still counts them.
    assert f(loss) == approx(-(0.0 + 1.0 + 1.5 + 0.0) / 4)
    assert f(m["is_oob_ratio"]) == approx(2 / 4)
    assert f(m["sampling_importance_ratio"]) == approx(2.5 / 4)


def test_seq_mask_tis_uses_geometric_mean():
    cfg = ClippedPGLossConfig(
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="seq-mask-tis",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.5,
    )
    # Seq 0: geo mean sqrt(4 * 0.5) = 1.41 -> kept, untruncated. Seq 1: sqrt(4 * 2) = 2.83 -> out.
    lp, data = make_batch([[1.0, 1.0], [1.0, 1.0]], [1.0, 1.0], weights=[[4.0, 0.5], [4.0, 2.0]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    assert f(loss) == approx(-(4.0 + 0.5) / 4)
    assert f(m["is_oob_ratio"]) == approx(2 / 4)


def test_gspo_importance_weight_is_per_sequence():
    cfg = ClippedPGLossConfig(
        token_level_loss=False,
        sequence_level_importance_ratios=True,
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="tis",
        truncated_importance_sampling_ratio=1.5,
    )
    # Seq 0 weights (4, 1): geo 2 -> truncated 1.5. Seq 1 (2, 0.5): geo 1.
    lp, data = make_batch([[1.0, 1.0], [1.0, 1.0]], [1.0, 1.0], weights=[[4.0, 1.0], [2.0, 0.5]])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    assert f(loss) == approx((-1.5 + -1.0) / 2)
    assert f(m["is_oob_ratio"]) == approx(2 / 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"truncated_importance_sampling_type": "tis"}, "use_importance_sampling_correction"),
        (
            {"use_importance_sampling_correction": True, "truncated_importance_sampling_type": "x"},
            "tis, icepop",
        ),
        (
            {
                "use_importance_sampling_correction": True,
                "truncated_importance_sampling_type": "icepop",
                "truncated_importance_sampling_ratio": 2.0,
            },
            "ratio_min",
        ),
        ({"ratio_clip_c": 1.0}, "ratio_clip_c"),
        ({"reference_policy_kl_type": "k4"}, "k1, k2 or k3"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClippedPGLossConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# KL penalty
# ---------------------------------------------------------------------------------------------


def _kl_batch(log_ref_minus_lp):
    lp, data = make_batch([[1.0] * len(log_ref_minus_lp)], [0.0])  # A = 0: actor loss is 0
    data["reference_policy_logprobs"] = lp.detach() + t([log_ref_minus_lp])
    return lp, data


def test_kl_penalty_k3():
    cfg = ClippedPGLossConfig(reference_policy_kl_penalty=0.1, reference_policy_kl_type="k3")
    lp, data = _kl_batch([LOG2, -LOG2])
    loss, m = ClippedPGLossFn(cfg)(lp, data)
    # k3 = e^x - 1 - x: (1 - log 2) + (log 2 - 0.5) = 0.5; mean 0.25; β 0.1
    assert f(loss) == approx(0.025)
    assert f(m["kl_penalty"]) == approx(0.025)
    loss.backward()
    # d k3 / d lp = -(e^x - 1) with x = ref - lp: [-1, 0.5], × β / 2 tokens
    torch.testing.assert_close(lp.grad, t([[-0.05, 0.025]]))


def test_kl_penalty_k1_and_k2():
    lp, data = _kl_batch([LOG2, 2 * LOG2])
    k1, _ = ClippedPGLossFn(
        ClippedPGLossConfig(reference_policy_kl_penalty=0.1, reference_policy_kl_type="k1")
    )(lp, data)
    assert f(k1) == approx(0.1 * -(LOG2 + 2 * LOG2) / 2)
    k2, _ = ClippedPGLossFn(
        ClippedPGLossConfig(reference_policy_kl_penalty=0.1, reference_policy_kl_type="k2")
    )(lp, data)
    assert f(k2) == approx(0.1 * 0.5 * (LOG2**2 + 4 * LOG2**2) / 2)


def test_kl_clamps():
    x = t([2 * LOG2])  # ref/π = 4
    lp = torch.zeros(1, dtype=F64)
    assert f(kl_estimate(lp, x, "k3")[0]) == approx(3.0 - 2 * LOG2)
    assert f(kl_estimate(lp, x, "k3", input_clamp_value=0.5)[0]) == approx(math.exp(0.5) - 1.5)
    assert f(kl_estimate(lp, x, "k3", output_clamp_value=1.0)[0]) == approx(1.0)


def test_kl_penalty_needs_reference():
    lp, data = make_batch([[1.0]], [1.0])
    with pytest.raises(KeyError, match="reference_policy_logprobs"):
        ClippedPGLossFn(ClippedPGLossConfig(reference_policy_kl_penalty=0.1))(lp, data)


# ---------------------------------------------------------------------------------------------
# Masks, global denominators, gradient routing
# ---------------------------------------------------------------------------------------------


def test_masks_exclude_prompt_padding_and_dropped_samples():
    fn = ClippedPGLossFn(ClippedPGLossConfig(0.2, 0.28))
    lp, data = make_batch(
        [[1.0, 1.5, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        [1.0, 1.0, 1.0],
        token_mask=[[0, 1, 0], [1, 1, 1], [1, 1, 1]],  # row 0: prompt + padding around 1 token
        sample_mask=[1, 1, 0],  # row 2 dropped
    )
    # Garbage where masked must not leak into value or gradient.
    with torch.no_grad():
        lp[0, 0] = -math.inf
        lp[0, 2] = math.nan
    data["prev_logprobs"][0, 2] = -math.inf
    loss, m = fn(lp, data)
    assert f(loss) == approx((-1.28 - 3.0) / 4)
    assert f(m["num_valid_samples"]) == 2.0
    assert f(m["probs_ratio_max"]) == approx(1.5)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert f(lp.grad[0, 0]) == 0.0 and f(lp.grad[2].abs().sum()) == 0.0


def test_no_valid_tokens_gives_zero_loss_and_neutral_extrema():
    lp, data = make_batch([[1.0, 1.0]], [1.0], token_mask=[[0, 0]])
    loss, m = ClippedPGLossFn()(lp, data)
    assert f(loss) == 0.0
    assert f(m["probs_ratio_min"]) == math.inf
    assert f(m["probs_ratio_max"]) == -math.inf


@pytest.mark.parametrize("token_level", [True, False])
def test_global_denominators_make_microbatches_add_up(token_level):
    torch.manual_seed(0)
    b, s = 4, 5
    prev = -torch.rand(b, s, dtype=F64) * 2
    lp_full = (prev + 0.3 * torch.randn(b, s, dtype=F64)).requires_grad_(True)
    mask = (torch.rand(b, s) > 0.3).to(F64)
    mask[:, 0] = 1.0
    data = {
        "prev_logprobs": prev,
        "generation_logprobs": prev + 0.2 * torch.randn(b, s, dtype=F64),
        "reference_policy_logprobs": prev + 0.1 * torch.randn(b, s, dtype=F64),
        "advantages": torch.randn(b, dtype=F64),
        "token_mask": mask,
        "sample_mask": t([1.0, 1.0, 0.0, 1.0]),
    }
    cfg = ClippedPGLossConfig(
        token_level_loss=token_level,
        reference_policy_kl_penalty=0.05,
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="tis",
        truncated_importance_sampling_ratio=1.1,
    )
    fn = ClippedPGLossFn(cfg)
    n_tok = (mask * data["sample_mask"][:, None]).sum()
    n_seq = data["sample_mask"].sum()
    full, m_full = fn(lp_full, data)
    full.backward()
    g_full = lp_full.grad.clone()

    lp2 = lp_full.detach().clone().requires_grad_(True)
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        mb = {k: v[rows] for k, v in data.items()}
        parts.append(fn(lp2[rows], mb, n_tok, n_seq))
    total = sum(p[0] for p in parts)
    total.backward()
    assert f(total) == approx(f(full))
    torch.testing.assert_close(lp2.grad, g_full)
    for name, how in METRIC_REDUCTIONS.items():
        vals = [p[1][name] for p in parts]
        if how == "sum":
            assert f(sum(vals)) == approx(f(m_full[name])), name
        elif how == "min":
            assert f(min(vals)) == approx(f(m_full[name])), name
        elif how == "max":
            assert f(max(vals)) == approx(f(m_full[name])), name


def test_gradient_flows_only_through_current_logprobs():
    cfg = ClippedPGLossConfig(
        reference_policy_kl_penalty=0.1, use_importance_sampling_correction=True
    )
    lp, data = make_batch([[1.1, 0.9]], [1.0], weights=[[1.2, 0.8]])
    data = {k: v.clone().requires_grad_(True) for k, v in data.items()}
    data["reference_policy_logprobs"] = (lp.detach() - 0.1).requires_grad_(True)
    loss, metrics = ClippedPGLossFn(cfg)(lp, data)
    loss.backward()
    assert lp.grad is not None and f(lp.grad.abs().sum()) > 0
    for name, v in data.items():
        assert v.grad is None, name
    assert all(not v.requires_grad for v in metrics.values())


def test_bf16_logprobs_compute_in_fp32():
    lp, data = make_batch([[1.0, 1.5]], [1.0])
    lp16 = lp.detach().to(torch.bfloat16).requires_grad_(True)
    loss, _ = ClippedPGLossFn()(lp16, data)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp16.grad is not None and lp16.grad.dtype == torch.bfloat16


def test_from_nemo_rl_dict():
    cfg = ClippedPGLossConfig.from_dict(
        {
            "ratio_clip_min": 0.2,
            "ratio_clip_max": 0.28,
            "ratio_clip_c": None,
            "use_on_policy_kl_approximation": False,
            "use_kl_in_reward": False,
            "token_level_loss": True,
        }
    )
    assert cfg.ratio_clip_max == 0.28
    assert ClippedPGLossFn({"ratio_clip_max": 0.3}).cfg.ratio_clip_max == 0.3
    with pytest.raises(ValueError, match="not supported"):
        ClippedPGLossConfig.from_dict({"use_cispo": True})
    with pytest.raises(ValueError, match="unknown"):
        ClippedPGLossConfig.from_dict({"ratio_clip": 0.2})
