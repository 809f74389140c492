"""Run the GRPO loop from a YAML config or recipe with ``key=value`` overrides::

    python examples/train.py examples/tiny/grpo_tiny.yaml policy.router_replay.mode=pr2
    python examples/train.py examples/recipes/qwen3_30b_a3b/pr2.yaml --variant tiny
    torchrun --nproc-per-node 4 examples/train.py examples/tiny/grpo_tiny.yaml \
        policy.expert_model_parallel_size=2 policy.pipeline_model_parallel_size=2

On a machine without CUDA it uses the project's test-only CPU shim (``tests/support``), which
lets real megatron-core run on gloo; the package itself never imports it (see ``pr2 train``).
Under torchrun the process group comes from torchrun's environment (RANK, WORLD_SIZE, ...).
"""

import argparse
import os
import sys
import warnings

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML trainer config (NeMo-RL key layout) or recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--variant", action="append", default=[], help="named recipe variant")
    args = parser.parse_intermixed_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    sys.path.insert(0, REPO_ROOT)
    from megatron_pr2.errors import USER_ERROR_EXIT_CODE, UserError, format_user_error

    try:
        run(args.config, args.overrides, args.variant)
    except UserError as err:  # a config or path mistake: one line, no traceback
        print(format_user_error(os.path.basename(__file__), err), file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


def run(config_path: str, overrides: list[str], variants: list[str]) -> None:
    """Load the config (bad keys fail before any process group exists), then train."""
    from megatron_pr2.recipes.loader import run_config

    config = run_config(config_path, overrides, variants)
    if torch.cuda.is_available():
        from megatron_pr2.commands.train import init_distributed_cuda

        init_distributed_cuda()
    else:
        from tests.support.dist import free_port, init_process  # installs the CPU shim

        if "WORLD_SIZE" in os.environ:  # torchrun
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            init_process(rank, world, int(os.environ["MASTER_PORT"]))
        else:  # a world-1 run picks its own free port
            init_process(0, 1, free_port())
    from megatron_pr2.rl.trainer import train

    train(config)


if __name__ == "__main__":
    main()
