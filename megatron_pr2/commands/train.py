"""``pr2 train CONFIG [--variant V] [key=value ...]``: the GRPO trainer on CUDA (``torchrun``
for several GPUs; the layout comes from ``policy.*_parallel_size``). CONFIG is a trainer config
or a recipe (its variants picked with ``--variant``)."""

from __future__ import annotations

import argparse
import os
import sys

CPU_HINT = (
    "pr2 train needs CUDA (megatron-core on NCCL). On a CPU-only machine run the same config "
    "with the test-only CPU shim: python examples/train.py CONFIG [key=value ...]"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from megatron_pr2.commands.overrides import add_parser_with_overrides

    parser = add_parser_with_overrides(
        subparsers, "train", help="GRPO run from a YAML config or recipe (CUDA)"
    )
    parser.add_argument("config", help="YAML trainer config (NeMo-RL key layout) or recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--variant", action="append", default=[], help="named recipe variant")
    parser.set_defaults(handler=run)


def init_distributed_cuda() -> None:
    """NCCL process group from torchrun's environment (world 1 without it); the trainer then
    initialises megatron's model parallelism from the config."""
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl")


def run(args: argparse.Namespace) -> int:
    from megatron_pr2.recipes.loader import run_config

    # a bad key is a ConfigError, before init
    config = run_config(args.config, args.overrides, args.variant)
    import torch

    if not torch.cuda.is_available():
        print(CPU_HINT, file=sys.stderr)
        return 2
    init_distributed_cuda()
    from megatron_pr2.rl.trainer import train as run_train

    run_train(config)
    return 0
