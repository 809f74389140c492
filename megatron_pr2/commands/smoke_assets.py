"""``pr2 smoke-assets RECIPE [--out DIR]``: what a recipe's ``smoke`` variant runs on.

Builds the recipe's model architecture at toy size with random weights, a character tokenizer
and train/val parquet in the recipe's data schema, and converts the model with
``pr2 convert hf-to-mcore`` (:mod:`megatron_pr2.recipes.smoke`). ``--out`` defaults to the
recipe's ``smoke/`` folder, where its ``smoke`` variant looks. Conversion needs CUDA; on a
CPU-only machine run ``python tools/make_smoke_assets.py`` with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("smoke-assets", help="toy model + tokenizer + data of a recipe")
    add_arguments(p)
    p.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (examples/recipes/<model>/...)")
    parser.add_argument("--out", default=None, help="output folder (default: <recipe dir>/smoke)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, launcher: Any = None) -> int:
    """0 on success; 1 with one line for a recipe or model the smoke path cannot build."""
    from megatron_pr2.commands import convert as convert_command
    from megatron_pr2.convert.errors import ConversionError
    from megatron_pr2.recipes.loader import RecipeError, load_recipe
    from megatron_pr2.recipes.smoke import make_smoke_assets

    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as exc:
        print(f"pr2 smoke-assets: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else recipe.base_dir / "smoke"

    def convert(hf_dir: Path, mcore_dir: Path) -> None:
        parser = argparse.ArgumentParser(prog="pr2 convert")
        convert_command.add_arguments(parser)
        argv = ["hf-to-mcore", str(hf_dir), str(mcore_dir), "--dtype", "bfloat16"]
        code = convert_command.run(
            parser.parse_args([*argv, "--overwrite", "--no-progress"]), launcher=launcher
        )
        if code:
            raise SystemExit(code)

    try:
        assets = make_smoke_assets(recipe, out, convert, seed=args.seed)
    except (RecipeError, ConversionError, KeyError, FileNotFoundError) as exc:
        print(f"pr2 smoke-assets: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    print(f"smoke assets of {args.recipe}:")
    for name in ("hf_dir", "checkpoint", "train_file", "val_file"):
        print(f"  {name:<11}{getattr(assets, name)}")
    return 0
