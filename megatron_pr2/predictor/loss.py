"""Predictor losses. Only the predictor weight receives gradient: the cached features and the
current logits (the target) are constants here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_pr2.config import PredictorLoss


def predictor_loss(
    kind: PredictorLoss,
    offset: torch.Tensor,
    old_logits: torch.Tensor,
    current_logits: torch.Tensor,
) -> torch.Tensor:
    """Mean over tokens of the per-token loss; all inputs ``[tokens, experts]``, fp32."""
    current_logits = current_logits.detach().float()
    old_logits = old_logits.float()
    if kind is PredictorLoss.KL_POST:
        target = F.log_softmax(current_logits, dim=-1)
        predicted = F.log_softmax(old_logits + offset, dim=-1)
        return F.kl_div(predicted, target, log_target=True, reduction="batchmean")
    delta = current_logits - old_logits
    if kind is PredictorLoss.KL_DELTA:
        return F.kl_div(
            F.log_softmax(offset, dim=-1),
            F.log_softmax(delta, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
    return F.mse_loss(offset, delta)
