"""GRPO advantages: rewards normalised within each prompt's group of n samples.

Group-relative baselines replace a value network; the group is the only place a prompt's
difficulty is visible, so every sample is compared with its siblings.
"""

from __future__ import annotations

import torch

__all__ = ["broadcast_to_tokens", "grpo_advantages"]


def grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages ``(r - baseline) / (std + eps)`` for prompt-major rewards.

    Args:
        rewards: [num_prompts * num_generations]; samples of one prompt are contiguous.
        num_generations: group size n.
        normalize_std: divide by the group's sample std (Bessel-corrected); off gives Dr.GRPO-style
            mean-centred advantages.
        leave_one_out: baseline is the mean of the other n - 1 samples (RLOO) instead of the
            group mean, so a sample's own reward does not lower its advantage.
        eps: added to the std so near-constant groups do not explode.

    Groups whose rewards are all identical get advantage 0 exactly: they carry no learning signal
    (DAPO filters them) and dividing a rounding residue by ``eps`` would invent one.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of {num_generations} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    if leave_one_out and num_generations < 2:
        raise ValueError("leave_one_out needs num_generations >= 2")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    groups = rewards.detach().to(dtype).view(-1, num_generations)
    n = num_generations
    total = groups.sum(dim=1, keepdim=True)
    if leave_one_out:
        baseline = (total - groups) / (n - 1)
    else:
        baseline = total / n
    adv = groups - baseline
    if normalize_std:
        std = groups.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(total)
        adv = adv / (std + eps)
    constant = (groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)).expand_as(adv)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] sample advantages -> [B, S] token advantages, zero outside the response."""
    if advantages.dim() != 1 or response_mask.dim() != 2:
        raise ValueError("advantages must be [B] and response_mask [B, S]")
    if advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"batch mismatch: {advantages.shape[0]} advantages vs {response_mask.shape[0]} rows"
        )
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)
