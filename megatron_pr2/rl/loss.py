"""Clipped policy-gradient loss (PPO / GRPO / DAPO / GSPO) with NeMo-RL's config keys and metrics.

Pure torch, so it runs on CPU in unit tests and on whatever device the logprobs live on in a
trainer. The loss is a *partial sum*: every microbatch is divided by the **global** number of
valid tokens (or sequences), so summing the microbatch losses and metrics over microbatches and
data-parallel ranks gives the global-batch value without any rescaling.

Notation per token t of sample b (all log-probs are of the sampled token):

* ``logprobs``: current policy π_θ (the only input that carries gradients).
* ``prev_logprobs``: π_old, the trainer's old-log-prob pass (with replayed routes under R2/R3/PR2).
* ``generation_logprobs``: μ, the rollout engine.
* ``reference_policy_logprobs``: π_ref, for the optional KL penalty.

PPO ratio r = π_θ / π_old; train/inference correction weight w = π_old / μ (pr2-algorithm §1.1:
the full off-policy ratio factorises as w · r).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

KLType = Literal["k1", "k2", "k3"]
TruncationType = Literal["tis", "icepop", "seq-mask-tis"]
MetricReduction = Literal["sum", "min", "max", "mean"]

__all__ = [
    "METRIC_REDUCTIONS",
    "ClippedPGLossConfig",
    "ClippedPGLossFn",
    "kl_estimate",
    "masked_mean",
]


@dataclass
class ClippedPGLossConfig:
    """``loss_fn.*`` keys, named and defaulted like NeMo-RL's ``ClippedPGLossConfig``.

    Attributes:
        ratio_clip_min: ε_low; the ratio is clamped below at ``1 - ratio_clip_min``.
        ratio_clip_max: ε_high; clamped above at ``1 + ratio_clip_max`` (DAPO clip-higher when
            larger than ``ratio_clip_min``).
        ratio_clip_c: dual-clip constant c > 1; for A < 0 the per-token loss is capped at
            ``-c * A``. ``None`` disables dual clip.
        reference_policy_kl_penalty: β of the KL-to-reference term added to the loss.
        reference_policy_kl_type: ``k1`` | ``k2`` | ``k3`` estimator (Schulman 2020).
        kl_input_clamp_value: clamp log(π_ref/π_θ) to ``[-v, v]`` before the estimator.
        kl_output_clamp_value: clamp the per-token KL estimate to ``[-v, v]``.
        token_level_loss: average over all valid tokens of the global batch (True) or average per
            sequence first, then over valid sequences (False).
        sequence_level_importance_ratios: GSPO; the PPO ratio (and the correction weight) of every
            token is the sequence's exp(mean token log-ratio). Requires ``token_level_loss=False``.
        use_importance_sampling_correction: multiply the per-token loss by w = π_old / μ.
        truncated_importance_sampling_type: ``None`` | ``tis`` (w ← min(w, max)) | ``icepop``
            (w ← 0 outside [min, max]) | ``seq-mask-tis`` (keep token w, but zero every sequence
            whose geometric-mean w is outside [min, max]).
        truncated_importance_sampling_ratio: the upper bound ``max`` above.
        truncated_importance_sampling_ratio_min: the lower bound ``min`` (icepop, seq-mask-tis).
        disable_ppo_ratio: REINFORCE / RLOO surrogate ``-A * log π_θ`` (no ratio, no clip); the
            ratio metrics are still reported as diagnostics.
    """

    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.28
    ratio_clip_c: float | None = None
    reference_policy_kl_penalty: float = 0.0
    reference_policy_kl_type: KLType = "k3"
    kl_input_clamp_value: float | None = None
    kl_output_clamp_value: float | None = None
    token_level_loss: bool = True
    sequence_level_importance_ratios: bool = False
    use_importance_sampling_correction: bool = False
    truncated_importance_sampling_type: TruncationType | None = None
    truncated_importance_sampling_ratio: float | None = None
    truncated_importance_sampling_ratio_min: float | None = None
    disable_ppo_ratio: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> ClippedPGLossConfig:
        """Build from a NeMo-RL ``loss_fn`` mapping (YAML).

        NeMo-RL keys this loss does not implement are accepted only at their off value, so a
        copied config works while a request for an unimplemented mode fails loudly.
        """
        known = set(cls.__dataclass_fields__)
        kwargs = {}
        for key, value in values.items():
            if key in known:
                kwargs[key] = value
            elif key in _UNIMPLEMENTED_NEMO_RL_KEYS:
                if value not in (None, False, 0, 0.0):
                    raise ValueError(f"loss_fn.{key}={value!r} is not supported here")
            else:
                raise ValueError(f"unknown loss_fn key {key!r}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Reject combinations that would silently compute something else than asked."""
        if self.ratio_clip_min < 0 or self.ratio_clip_max < 0:
            raise ValueError("loss_fn.ratio_clip_min/ratio_clip_max must be >= 0")
        if self.ratio_clip_c is not None and self.ratio_clip_c <= 1.0:
            raise ValueError(f"loss_fn.ratio_clip_c must be > 1 (got {self.ratio_clip_c})")
        if self.reference_policy_kl_type not in ("k1", "k2", "k3"):
            raise ValueError(
                f"loss_fn.reference_policy_kl_type must be k1, k2 or k3 "
                f"(got {self.reference_policy_kl_type!r})"
            )
        if self.sequence_level_importance_ratios and self.token_level_loss:
            raise ValueError(
                "loss_fn.sequence_level_importance_ratios (GSPO) needs token_level_loss=false"
            )
        kind = self.truncated_importance_sampling_type
        if kind is None:
            return
        if kind not in ("tis", "icepop", "seq-mask-tis"):
            raise ValueError(
                f"loss_fn.truncated_importance_sampling_type must be tis, icepop or seq-mask-tis "
                f"(got {kind!r})"
            )
        if not self.use_importance_sampling_correction:
            raise ValueError(
                "loss_fn.truncated_importance_sampling_type needs "
                "use_importance_sampling_correction=true"
            )
        hi = self.truncated_importance_sampling_ratio
        if hi is None or hi <= 0:
            raise ValueError("loss_fn.truncated_importance_sampling_ratio must be set and > 0")
        if kind in ("icepop", "seq-mask-tis"):
            lo = self.truncated_importance_sampling_ratio_min
            if lo is None or not 0 <= lo <= hi:
                raise ValueError(
                    f"loss_fn.truncated_importance_sampling_ratio_min must be set and in [0, {hi}] "
                    f"for {kind}"
                )


_UNIMPLEMENTED_NEMO_RL_KEYS = frozenset(
    {
        "use_kl_in_reward",
        "use_on_policy_kl_approximation",
        "force_on_policy_ratio",
        "use_cispo",
        "positive_example_nll_weight",
    }
)

# How each metric combines across microbatches / ranks. "sum" metrics are already divided by the
# global denominators; "min"/"max" are local extrema; "mean" is a local statistic (average it).
METRIC_REDUCTIONS: dict[str, MetricReduction] = {
    "loss": "sum",
    "probs_ratio": "sum",
    "probs_ratio_clamped": "sum",
    "probs_ratio_min": "min",
    "probs_ratio_max": "max",
    "probs_ratio_std": "mean",
    "clip_fraction_low": "sum",
    "clip_fraction_high": "sum",
    "token_mult_prob_error": "sum",
    "gen_kl_error": "sum",
    "policy_kl_error": "sum",
    "js_divergence_error": "sum",
    "sampling_importance_ratio": "sum",
    "approx_entropy": "sum",
    "kl_penalty": "sum",
    "is_oob_ratio": "sum",
    "num_valid_samples": "sum",
}


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    denominator: float | torch.Tensor | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """sum(values * mask) / denominator (local mask count when ``None``, at least 1).

    Multiplying by the mask (not indexing) keeps shapes static and zeroes padding gradients; the
    ``where`` guards against inf/nan in masked positions leaking through ``0 * inf``.
    """
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    if denominator is None:
        denominator = mask.sum() if dim is None else mask.sum(dim=dim)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.dtype).clamp_min(1.0)
    else:
        denominator = max(float(denominator), 1.0)
    return total / denominator


def kl_estimate(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    kl_type: KLType = "k3",
    input_clamp_value: float | None = None,
    output_clamp_value: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled by π (Schulman 2020 k1/k2/k3).

    With log r = log π_ref - log π: k1 = -log r (unbiased, can be negative), k2 = (log r)² / 2,
    k3 = r - 1 - log r (unbiased and >= 0). Clamps bound the damage of outlier tokens.
    """
    log_r = reference_logprobs - logprobs
    if input_clamp_value is not None:
        log_r = log_r.clamp(-input_clamp_value, input_clamp_value)
    if kl_type == "k1":
        kl = -log_r
    elif kl_type == "k2":
        kl = 0.5 * log_r.square()
    elif kl_type == "k3":
        kl = torch.exp(log_r) - 1.0 - log_r
    else:
        raise ValueError(f"unknown kl_type {kl_type!r}")
    if output_clamp_value is not None:
        kl = kl.clamp(-output_clamp_value, output_clamp_value)
    return kl


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_r) - 1.0 - log_r


def _js_from_log_weight(log_w: torch.Tensor) -> torch.Tensor:
    """Per-token Jensen-Shannon estimate between p and μ from x ~ μ, with w = p / μ.

    JS(μ, p) = E_μ[f(w)], f(w) = ½[w log(2w / (1 + w)) + log(2 / (1 + w))]; f is convex with its
    minimum f(1) = 0, so every term is >= 0 and bounded by log 2 in expectation.
    """
    w = torch.exp(log_w)
    log_1pw = torch.nn.functional.softplus(log_w)  # log(1 + w), stable for large |log_w|
    return 0.5 * (w * (math.log(2.0) + log_w - log_1pw) + (math.log(2.0) - log_1pw))


def _as_float_tensor(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype)


class ClippedPGLossFn:
    """PPO-style clipped surrogate with NeMo-RL's semantics and metric names.

    ``__call__`` returns ``(loss, metrics)``; ``loss`` is this microbatch's share of the global
    loss (see the module docstring). Metrics are detached 0-d tensors; combine them across
    microbatches with :data:`METRIC_REDUCTIONS`. Token metrics are normalised by
    ``global_valid_tokens`` whatever ``token_level_loss`` is.

    Metrics:
        loss: the returned loss value.
        probs_ratio: mean PPO ratio π_θ / π_old over valid tokens (sequence ratio under GSPO).
        probs_ratio_clamped: mean of the ratio clamped to [1 - ε_low, 1 + ε_high].
        probs_ratio_min / probs_ratio_max: extrema over this microbatch's valid tokens
            (+inf / -inf when there are none, the neutral element of min / max).
        probs_ratio_std: std of the ratio over this microbatch's valid tokens (local).
        clip_fraction_low: share of valid tokens whose clamp is active at the bottom: A < 0 and
            r < 1 - ε_low (their gradient is zero).
        clip_fraction_high: share of valid tokens clamped at the top: A > 0 and r > 1 + ε_high.
        token_mult_prob_error: mean of exp(|log π_old - log μ|); 1.0 means trainer and rollout
            engine agree exactly (the routing-replay health metric).
        gen_kl_error: mean k3 estimate of KL(μ ‖ π_old) on the rollout's tokens.
        policy_kl_error: mean k3 estimate of KL(π_old ‖ π_θ) (how far training moved the policy).
        js_divergence_error: Jensen-Shannon divergence between π_old and μ (bounded by log 2,
            robust to the outlier tokens that dominate the KLs).
        sampling_importance_ratio: mean correction weight w = π_old / μ after truncation/masking
            (the raw mean when the correction is off).
        approx_entropy: mean of -log π_θ over the sampled tokens (entropy estimate under μ).
        kl_penalty: the KL-to-reference term included in ``loss`` (β x reduced KL; 0 when off).
        is_oob_ratio: share of valid tokens whose weight was truncated (tis) or masked (icepop,
            seq-mask-tis); 0 when no truncation is configured.
        num_valid_samples: number of samples with ``sample_mask`` set in this microbatch.
    """

    def __init__(self, cfg: ClippedPGLossConfig | Mapping[str, object] | None = None) -> None:
        if cfg is None:
            cfg = ClippedPGLossConfig()
        elif not isinstance(cfg, ClippedPGLossConfig):
            cfg = ClippedPGLossConfig.from_dict(cfg)
        self.cfg = cfg

    @property
    def loss_type(self) -> str:
        """``token_level`` or ``sequence_level``: which global denominator the trainer must pass."""
        return "token_level" if self.cfg.token_level_loss else "sequence_level"

    def __call__(
        self,
        logprobs: torch.Tensor,
        data: Mapping[str, torch.Tensor],
        global_valid_tokens: float | torch.Tensor | None = None,
        global_valid_seqs: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss share and metrics of one microbatch.

        Args:
            logprobs: [B, S] current log-probs of the sampled tokens (with gradients).
            data: ``prev_logprobs`` [B, S], ``advantages`` [B, S] or [B], ``token_mask`` [B, S];
                optional ``generation_logprobs`` [B, S] (defaults to ``prev_logprobs``),
                ``reference_policy_logprobs`` [B, S] (needed when the KL penalty is on),
                ``sample_mask`` [B] (defaults to all ones).
            global_valid_tokens: valid tokens in the whole global batch (all microbatches and
                ranks). ``None`` uses this microbatch's count (single-microbatch use).
            global_valid_seqs: valid sequences in the global batch, same convention.
        """
        cfg = self.cfg
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, S], got {tuple(logprobs.shape)}")
        dtype = torch.promote_types(logprobs.dtype, torch.float32)
        lp = logprobs.to(dtype)
        batch, seqlen = lp.shape

        prev = _as_float_tensor(data["prev_logprobs"], dtype)
        gen_raw = data.get("generation_logprobs")
        gen = prev if gen_raw is None else _as_float_tensor(gen_raw, dtype)
        adv = _as_float_tensor(data["advantages"], dtype)
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1).expand(batch, seqlen)
        sample_mask_raw = data.get("sample_mask")
        sample_mask = (
            torch.ones(batch, dtype=dtype, device=lp.device)
            if sample_mask_raw is None
            else _as_float_tensor(sample_mask_raw, dtype)
        )
        mask = _as_float_tensor(data["token_mask"], dtype) * sample_mask.unsqueeze(-1)
        for name, t in (("prev_logprobs", prev), ("generation_logprobs", gen), ("advantages", adv)):
            if t.shape != lp.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs {tuple(lp.shape)}")

        # Masked positions may hold garbage (e.g. -inf padding). Zero them in every input so no
        # inf/nan reaches a value or, through the where-trap, a gradient.
        valid = mask.bool()
        zeros = torch.zeros_like(lp)
        lp = torch.where(valid, lp, zeros)
        prev = torch.where(valid, prev, zeros)
        gen = torch.where(valid, gen, zeros)
        local_tokens = mask.sum()
        local_seqs = sample_mask.sum()
        tok_denom = local_tokens if global_valid_tokens is None else global_valid_tokens
        seq_denom = local_seqs if global_valid_seqs is None else global_valid_seqs
        seq_tokens = mask.sum(dim=-1).clamp_min(1.0)

        def reduce_loss(per_token: torch.Tensor) -> torch.Tensor:
            if cfg.token_level_loss:
                return masked_mean(per_token, mask, tok_denom)
            per_seq = masked_mean(per_token, mask, seq_tokens, dim=-1)
            return masked_mean(per_seq, sample_mask, seq_denom)

        def seq_mean_broadcast(x: torch.Tensor) -> torch.Tensor:
            return masked_mean(x, mask, seq_tokens, dim=-1).unsqueeze(-1).expand(batch, seqlen)

        # PPO ratio: token-level, or GSPO's exp(mean token log-ratio) shared by the sequence.
        log_ratio = lp - prev
        if cfg.sequence_level_importance_ratios:
            log_ratio = seq_mean_broadcast(log_ratio)
        ratio = torch.exp(log_ratio)
        ratio_clamped = ratio.clamp(1.0 - cfg.ratio_clip_min, 1.0 + cfg.ratio_clip_max)

        if cfg.disable_ppo_ratio:
            per_token = -adv * lp
        else:
            per_token = torch.maximum(-adv * ratio, -adv * ratio_clamped)
            if cfg.ratio_clip_c is not None:
                dual = torch.minimum(per_token, -adv * cfg.ratio_clip_c)
                per_token = torch.where(adv < 0, dual, per_token)

        # Train/inference correction w = π_old / μ (per token, or per sequence for GSPO).
        log_w = prev - gen
        if cfg.sequence_level_importance_ratios:
            log_w = seq_mean_broadcast(log_w)
        w_raw = torch.exp(log_w)
        weights, oob = self._truncate(w_raw, log_w, mask, seq_tokens)
        if cfg.use_importance_sampling_correction:
            per_token = weights * per_token

        actor_loss = reduce_loss(per_token)

        kl_term = torch.zeros((), dtype=dtype, device=lp.device)
        if cfg.reference_policy_kl_penalty != 0.0:
            ref_raw = data.get("reference_policy_logprobs")
            if ref_raw is None:
                raise KeyError("reference_policy_kl_penalty != 0 needs reference_policy_logprobs")
            ref = torch.where(valid, _as_float_tensor(ref_raw, dtype), zeros)
            kl = kl_estimate(
                lp,
                ref,
                cfg.reference_policy_kl_type,
                cfg.kl_input_clamp_value,
                cfg.kl_output_clamp_value,
            )
            if cfg.use_importance_sampling_correction:
                kl = weights * kl
            kl_term = cfg.reference_policy_kl_penalty * reduce_loss(kl)

        loss = actor_loss + kl_term

        with torch.no_grad():
            metrics = self._metrics(
                lp.detach(),
                prev,
                gen,
                adv,
                mask,
                ratio.detach(),
                ratio_clamped.detach(),
                weights,
                oob,
                tok_denom,
            )
            metrics["loss"] = loss.detach()
            metrics["kl_penalty"] = kl_term.detach()
            metrics["num_valid_samples"] = local_seqs
        return loss, metrics

    def _truncate(
        self,
        w: torch.Tensor,
        log_w: torch.Tensor,
        mask: torch.Tensor,
        seq_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the configured truncation; return (weights, out-of-bounds token indicator)."""
        cfg = self.cfg
        kind = cfg.truncated_importance_sampling_type
        zeros = torch.zeros_like(w)
        if kind is None:
            return w, zeros
        hi = float(cfg.truncated_importance_sampling_ratio)  # type: ignore[arg-type]
        if kind == "tis":
            return w.clamp(max=hi), (w > hi).to(w.dtype)
        lo = float(cfg.truncated_importance_sampling_ratio_min)  # type: ignore[arg-type]
        if kind == "icepop":
            inside = (w >= lo) & (w <= hi)
            return torch.where(inside, w, zeros), (~inside).to(w.dtype)
        # seq-mask-tis: geometric mean of w over the sequence's valid tokens decides for the whole
        # sequence; surviving sequences keep their (untruncated) token weights.
        geo = torch.exp(masked_mean(log_w, mask, seq_tokens, dim=-1)).unsqueeze(-1)
        inside = ((geo >= lo) & (geo <= hi)).expand_as(w)
        return torch.where(inside, w, zeros), (~inside).to(w.dtype)

    def _metrics(
        self,
        lp: torch.Tensor,
        prev: torch.Tensor,
        gen: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        ratio: torch.Tensor,
        ratio_clamped: torch.Tensor,
        weights: torch.Tensor,
        oob: torch.Tensor,
        tok_denom: float | torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        valid = mask.bool()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return masked_mean(x, mask, tok_denom)

        # Branch-free (no host sync): masked extrema and local population std.
        r_min = torch.where(valid, ratio, torch.full_like(ratio, math.inf)).min()
        r_max = torch.where(valid, ratio, torch.full_like(ratio, -math.inf)).max()
        local_mean = masked_mean(ratio, mask)
        r_std = masked_mean((ratio - local_mean).square(), mask).sqrt()
        clipped_low = ((adv < 0) & (ratio < 1.0 - cfg.ratio_clip_min)).to(mask.dtype)
        clipped_high = ((adv > 0) & (ratio > 1.0 + cfg.ratio_clip_max)).to(mask.dtype)

        gen_log_w = prev - gen
        policy_log_r = lp - prev
        return {
            "probs_ratio": mean(ratio),
            "probs_ratio_clamped": mean(ratio_clamped),
            "probs_ratio_min": r_min,
            "probs_ratio_max": r_max,
            "probs_ratio_std": r_std,
            "clip_fraction_low": mean(clipped_low),
            "clip_fraction_high": mean(clipped_high),
            "token_mult_prob_error": mean(torch.exp(gen_log_w.abs())),
            "gen_kl_error": mean(_k3(gen_log_w)),
            "policy_kl_error": mean(_k3(policy_log_r)),
            "js_divergence_error": mean(_js_from_log_weight(gen_log_w)),
            "sampling_importance_ratio": mean(weights),
            "approx_entropy": mean(-lp),
            "is_oob_ratio": mean(oob),
        }
