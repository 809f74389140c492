"""``pr2 smoke-assets`` that also runs on a CPU-only machine::

    python tools/make_smoke_assets.py examples/recipes/qwen3_30b_a3b/base.yaml [--out DIR]

With CUDA it is exactly ``pr2 smoke-assets``. Without, the conversion step gets the project's
test-only CPU shim (``tests/support``) and a gloo process group, as tools/convert_checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, REPO_ROOT)
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import torch

    from megatron_pr2.commands import smoke_assets

    parser = argparse.ArgumentParser(prog="make_smoke_assets", description=__doc__.splitlines()[0])
    smoke_assets.add_arguments(parser)
    args = parser.parse_args(argv)
    launcher = None
    if not torch.cuda.is_available():
        from convert_checkpoint import CpuLauncher

        launcher = CpuLauncher()
    return smoke_assets.run(args, launcher=launcher)


if __name__ == "__main__":
    raise SystemExit(main())
