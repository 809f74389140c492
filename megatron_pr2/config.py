"""The replay configuration: one dataclass, NeMo-RL's ``policy.router_replay`` key layout."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReplayMode(str, enum.Enum):
    """Where the replayed routes come from.

    ``none``: live routing. ``r2``: recorded by the trainer's own forward-only (old-log-prob) pass.
    ``r3``: supplied from outside, e.g. the rollout engine's routes.
    """

    NONE = "none"
    R2 = "r2"
    R3 = "r3"

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


@dataclass
class RouterReplayConfig:
    """``policy.router_replay``: how MoE routers choose experts during RL training.

    Attributes:
        mode: see :class:`ReplayMode`.
        collect_metrics: compare each replayed route with the live router's top-k (one extra
            top-k per router forward, no host sync) for agreement / zero-deviation metrics.
        allow_token_dropping: capacity-factor token dropping runs after replay and may drop
            replayed (token, expert) pairs; refused unless this is set.
    """

    mode: ReplayMode = ReplayMode.NONE
    collect_metrics: bool = True
    allow_token_dropping: bool = False

    def __post_init__(self) -> None:
        self.mode = ReplayMode.parse(self.mode)

    @property
    def enabled(self) -> bool:
        return self.mode is not ReplayMode.NONE
