"""Predictor losses. Only the predictor weight receives gradient: the cached features and the
current logits (the target) are constants here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_pr2.config import PredictorLoss


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def per_token_predictor_loss(
    kind: PredictorLoss,
    offset: torch.Tensor,
    old_logits: torch.Tensor,
    current_logits: torch.Tensor,
) -> torch.Tensor:
    """``[tokens]`` losses; inputs ``[tokens, experts]``. Forward KL(target || prediction),
    summed over experts (the paper's direction, not the reversed one of early reference code);
    L2 is averaged over experts."""
    current_logits = _fp32(current_logits.detach())
    old_logits = _fp32(old_logits)
    if kind is PredictorLoss.KL_POST:
        target = F.log_softmax(current_logits, dim=-1)
        predicted = F.log_softmax(old_logits + offset, dim=-1)
        return F.kl_div(predicted, target, log_target=True, reduction="none").sum(dim=-1)
    delta = current_logits - old_logits
    if kind is PredictorLoss.KL_DELTA:
        target = F.log_softmax(delta, dim=-1)
        predicted = F.log_softmax(offset, dim=-1)
        return F.kl_div(predicted, target, log_target=True, reduction="none").sum(dim=-1)
    return (offset - delta).pow(2).mean(dim=-1)
