"""Next-token sampling on the device that holds the logits: temperature, top-k, top-p.

Why on device: a rollout engine that copies ``[batch, vocab]`` fp32 logits to the host every
step spends more time in the copy than in the forward at large vocabularies. Here only the
chosen ids and their log-probs leave the device.

Why one uniform per row from the caller's generator: the trainer seeds one host
``torch.Generator`` for the whole run (checkpointed, restored on resume). Drawing ``[rows]``
uniforms from it on its own device and inverting the CDF on the logits' device keeps that single
source of randomness reproducible whatever device generates, at the cost of ``rows`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample_next", "sampling_probs"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``top_k=None``: no top-k cut; ``top_k=1`` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    sample_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one id per row of ``[rows, vocab]`` logits; returns ``(ids, raw log-probs)``.

    ``sample_vocab_size``: sample only ids below it (a tokenizer smaller than the model's
    vocabulary). The log-probs are of the *unmodified* full-vocabulary distribution (vLLM's
    ``raw_logprobs``), so they compare with the trainer's log-probs whatever the sampling knobs.
    """
    logits = logits.float()
    candidates = logits[:, :sample_vocab_size] if sample_vocab_size else logits
    probs = sampling_probs(candidates, params)
    if params.top_k == 1:
        ids = probs.argmax(dim=-1)  # greedy: no draw, so the generator's state is untouched
    else:
        device = generator.device if generator is not None else probs.device
        uniform = torch.rand(probs.shape[0], 1, generator=generator, device=device)
        cdf = probs.cumsum(dim=-1)
        # Inverse CDF; the clamp guards a uniform above the last cumsum (rounding).
        scaled = uniform.to(probs.device, probs.dtype) * cdf[:, -1:]
        ids = torch.searchsorted(cdf, scaled, right=True).squeeze(1)
        ids = ids.clamp_(max=probs.shape[1] - 1)
    raw = torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).squeeze(1)
    return ids, raw


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: top-k, then temperature, then nucleus (as vLLM orders
    them); zero outside the kept set, not renormalised (the inverse CDF scales by the total)."""
    if params.top_k is not None and params.top_k < logits.shape[1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = torch.where(before < params.top_p, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs
