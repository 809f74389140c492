"""The replay configuration: one dataclass, NeMo-RL's ``policy.router_replay`` key layout."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReplayMode(str, enum.Enum):
    """Where the replayed routes come from.

    ``none``: live routing. ``r2``: recorded by the trainer's own forward-only (old-log-prob) pass.
    ``r3``: supplied from outside, e.g. the rollout engine's routes.
    ``pr2``: recorded like ``r2``, but each router selects top-k of ``old logits + predicted
    offset`` from its zero-initialised evolution predictor.
    ``pr2_r3``: the paper's rollout flavour: the rollout engine applies the predictor and its
    routes are replayed as in ``r3``; the trainer still trains the predictor (features cached in
    the old-log-prob pass, loss in later mini-steps) and hands it to the engine at each refit.
    """

    NONE = "none"
    R2 = "r2"
    R3 = "r3"
    PR2 = "pr2"
    PR2_R3 = "pr2_r3"

    @classmethod
    def parse(cls, value: str | ReplayMode) -> ReplayMode:
        if isinstance(value, ReplayMode):
            return value
        normalized = str(value).strip().lower()
        if normalized in ("disabled", "off", "false"):
            normalized = "none"
        try:
            return cls(normalized)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(
                f"router_replay.mode: unknown mode {value!r}; choose one of {choices}"
            ) from None


class PredictorLoss(str, enum.Enum):
    KL_POST = "kl_post"  # KL(sg softmax(current logits) || softmax(old logits + offset))
    KL_DELTA = "kl_delta"  # KL(softmax(sg(current - old logits)) || softmax(offset))
    L2 = "l2"  # MSE(offset, sg(current - old logits))


@dataclass
class PredictorConfig:
    """``policy.router_replay.predictor``: the PR2 evolution predictor.

    Attributes:
        loss_type: see :class:`PredictorLoss`.
        lr_mult: predictor learning rate = ``lr_mult`` x base learning rate (weight decay 0).
        bias_in_gate_weights: use ``old logits + offset`` for the recording pass's gate weights
            too (paper fidelity). Off by default, so old log-probs equal plain routing's at
            mini-step 0 and the offset only changes *which* experts are used.
        cache_keep_fraction: share of tokens whose (router input, old logits) are cached in the
            recording pass, picked by a hash of (sample, position) so every pass and rank agrees.
            The default 0.03 in bf16 costs 1.5 % of an unbounded fp32 cache (Qwen3-30B-A3B:
            6.1 KiB instead of 408 KiB per token of the batch).
        cache_tokens_per_step: hard cap on cached tokens per recording pass, layer and rank.
        cache_dtype: host storage dtype of the cache (``bf16``, ``fp16`` or ``fp32``).
        offset_clip: a magnitude clip on the offset where it picks routes: each entry within
            ``offset_clip`` x the std over experts of that token's old logits (0: off). Only
            tokens near a top-k boundary can then change experts, as the router's small
            per-update drift changes them; training the predictor is unchanged.
    """

    loss_type: PredictorLoss = PredictorLoss.KL_POST
    lr_mult: float = 1000.0
    bias_in_gate_weights: bool = False
    cache_keep_fraction: float = 0.03
    cache_tokens_per_step: int = 65536
    cache_dtype: str = "bf16"
    offset_clip: float = 0.0

    def __post_init__(self) -> None:
        if not self.offset_clip >= 0.0:
            raise ValueError(f"predictor.offset_clip must be >= 0, got {self.offset_clip}")
        if not isinstance(self.loss_type, PredictorLoss):
            self.loss_type = PredictorLoss(str(self.loss_type).replace("-", "_"))
        if self.cache_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(
                f"predictor.cache_dtype: expected bf16, fp16 or fp32, got {self.cache_dtype!r}"
            )
        if self.cache_tokens_per_step < 1:
            raise ValueError("predictor.cache_tokens_per_step must be >= 1")
        if not 0.0 < self.cache_keep_fraction <= 1.0:
            raise ValueError(
                f"predictor.cache_keep_fraction must be in (0, 1], got {self.cache_keep_fraction}"
            )


@dataclass
class RouterReplayConfig:
    """``policy.router_replay``: how MoE routers choose experts during RL training.

    Attributes:
        mode: see :class:`ReplayMode`.
        collect_metrics: compare each replayed route with the live router's top-k (one extra
            top-k per router forward, no host sync) for agreement / zero-deviation metrics.
        metrics_token_stride: measure those metrics on every n-th token only (a fixed sample of
            each router call) to cut their cost by ~n. Default 16: the extra top-k otherwise
            costs ~40 % of a replayed router step; over a step's layers and microbatches the
            sample is still thousands of tokens. 1 = every token (exact).
        allow_token_dropping: capacity-factor token dropping runs after replay and may drop
            replayed (token, expert) pairs; refused unless this is set.
    """

    mode: ReplayMode = ReplayMode.NONE
    collect_metrics: bool = True
    metrics_token_stride: int = 16
    allow_token_dropping: bool = False
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        self.mode = ReplayMode.parse(self.mode)
        if self.metrics_token_stride < 1:
            raise ValueError(
                f"router_replay.metrics_token_stride must be >= 1, got {self.metrics_token_stride}"
            )
        if isinstance(self.predictor, dict):
            self.predictor = PredictorConfig(**self.predictor)

    @property
    def uses_predictor(self) -> bool:
        return self.mode in (ReplayMode.PR2, ReplayMode.PR2_R3)

    @property
    def uses_external_routes(self) -> bool:
        """Routes come from the rollout engine (``r3``, ``pr2_r3``), not the trainer."""
        return self.mode in (ReplayMode.R3, ReplayMode.PR2_R3)

    @property
    def enabled(self) -> bool:
        return self.mode is not ReplayMode.NONE

    @property
    def observes_drift(self) -> bool:
        """``none`` with metrics on: routers route live but compare each update pass's top-k with
        the old-log-prob pass's (the router drift that replay would have hidden)."""
        return self.mode is ReplayMode.NONE and self.collect_metrics

    @property
    def installs_router(self) -> bool:
        """Whether models get the replay router (else plain megatron-core routers)."""
        return self.enabled or self.observes_drift
