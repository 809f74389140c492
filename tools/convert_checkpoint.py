"""Checkpoint conversion (``pr2 convert``) that also runs on a CPU-only machine::

    python tools/convert_checkpoint.py hf-to-mcore HF_DIR OUT_DIR --tp 2 --ep 2
    python tools/convert_checkpoint.py mcore-to-hf CKPT_DIR OUT_DIR [--expert-layout fused]

With CUDA it is exactly ``pr2 convert``. Without, it gives megatron-core the project's test-only
CPU shim (``tests/support``) and gloo process groups, starting the layout's processes itself
(or using torchrun's).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CpuLauncher:
    """gloo process groups with the CPU shim installed in every process."""

    def init_world1(self) -> None:
        from tests.support.dist import free_port, init_process

        init_process(0, 1, free_port())

    def init_from_env(self) -> None:
        import torch.distributed as dist

        from tests.support import cpu_shim

        cpu_shim.install()
        if not dist.is_initialized():
            dist.init_process_group("gloo")

    def spawn(self, fn: Callable[..., None], world_size: int, *args: Any) -> None:
        from tests.support.dist import run_dist

        run_dist(fn, world_size, *args)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, REPO_ROOT)
    from megatron_pr2.commands import convert

    parser = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.splitlines()[0])
    convert.add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    launcher = None if torch.cuda.is_available() else CpuLauncher()
    return convert.run(args, launcher=launcher)


if __name__ == "__main__":
    raise SystemExit(main())
