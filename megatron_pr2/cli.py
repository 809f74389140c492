"""``pr2``: the project's command line."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_pr2 import __version__

CPU_HINT = (
    "pr2 train needs CUDA (megatron-core on NCCL). On a CPU-only machine run the same config "
    "with the test-only CPU shim: python examples/train.py CONFIG [key=value ...]"
)


def init_world1_cuda() -> None:
    """World-1 NCCL process group and megatron parallel state (the trainer's precondition)."""
    import torch
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pr2", description="megatron-pr2 command line")
    parser.add_argument("--version", action="version", version=f"megatron-pr2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and the tested megatron-core versions")
    train = sub.add_parser("train", help="world-1 GRPO run from a YAML config (CUDA only)")
    train.add_argument("config", help="YAML config (NeMo-RL key layout)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.command == "info":
        from megatron_pr2.patch.version import TESTED_VERSIONS, megatron_core_version

        tested = ", ".join(str(v) for v in TESTED_VERSIONS)
        print(f"megatron-pr2 {__version__}")
        print(f"megatron-core {megatron_core_version()} (tested: {tested})")
    elif args.command == "train":
        import torch

        if not torch.cuda.is_available():
            print(CPU_HINT, file=sys.stderr)
            raise SystemExit(2)
        from megatron_pr2.rl.config import load_config

        config = load_config(args.config, args.overrides)  # fail on bad keys before init
        init_world1_cuda()
        from megatron_pr2.rl.trainer import train as run_train

        run_train(config)
