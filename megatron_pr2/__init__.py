"""megatron-pr2: routing replay (R2, R3) and Predictive Routing Replay (PR2) for megatron-core."""

__version__ = "0.1.0"
