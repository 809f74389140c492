"""Tests that need the launch venv (nemo-run) and, for SLURM, a running localhost cluster."""
