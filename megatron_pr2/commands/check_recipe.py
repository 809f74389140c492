"""``pr2 check-recipe RECIPE [key=value ...] [--variant NAME]``: validate a recipe before a launch.

Checks the recipe against its model's HF config shape and its cluster's world size, and prints
a per-GPU memory estimate: params, grads, optimizer, activations with and without recompute,
logits (formulas: :mod:`megatron_pr2.recipes.check`). Exit code 1 when any
check fails, so CI and ``pr2 launch`` can stop before a job is queued.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from megatron_pr2.commands.overrides import add_parser_with_overrides

    parser = add_parser_with_overrides(
        subparsers,
        "check-recipe",
        help="validate a recipe (model shape, parallel sizes) and estimate memory",
    )
    parser.add_argument("recipe", help="recipe YAML (examples/recipes/...)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides (also after flags)"
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="a named variant of the recipe (repeatable)"
    )
    parser.add_argument("--nodes", type=int, help="override cluster.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="override cluster.gpus_per_node")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megatron_pr2.recipes.check import check_recipe, format_result
    from megatron_pr2.recipes.loader import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, args.variant)
    except RecipeError as exc:
        print(f"recipe {args.recipe}\n  error: {exc}\n  FAILED (1 error(s))", file=sys.stderr)
        return 1
    flags = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node}
    result = check_recipe(recipe, flags)
    print(format_result(recipe, result), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
