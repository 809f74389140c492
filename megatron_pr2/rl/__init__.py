"""RL pieces for end-to-end replay tests: NeMo-RL-style clipped PG loss, GRPO advantages and a
synthetic verifiable task. Pure torch; nothing here imports megatron."""

from megatron_pr2.rl.advantages import broadcast_to_tokens, grpo_advantages
from megatron_pr2.rl.loss import (
    METRIC_REDUCTIONS,
    ClippedPGLossConfig,
    ClippedPGLossFn,
    kl_estimate,
    masked_mean,
)
from megatron_pr2.rl.task import (
    CharTokenizer,
    Prompt,
    SupervisedExample,
    SyntheticTask,
    TaskConfig,
)

__all__ = [
    "METRIC_REDUCTIONS",
    "CharTokenizer",
    "ClippedPGLossConfig",
    "ClippedPGLossFn",
    "Prompt",
    "SupervisedExample",
    "SyntheticTask",
    "TaskConfig",
    "broadcast_to_tokens",
    "grpo_advantages",
    "kl_estimate",
    "masked_mean",
]
