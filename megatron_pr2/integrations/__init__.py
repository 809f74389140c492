"""Adapters for RL frameworks that drive megatron's native router-replay calls themselves."""
