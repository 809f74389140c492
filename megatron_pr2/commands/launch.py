"""``pr2 launch RECIPE [key=value ...] --executor local|slurm [...] [--dryrun]``.

Runs the GRPO trainer through nemo-run with the torchrun launcher: ``pr2 train`` on GPUs,
``python examples/train.py`` on CPU (``--gpus-per-node 0``). Flags override the recipe's
``cluster:`` section. The recipe is checked first (``pr2 check-recipe``); ``--dryrun`` prints the
generated sbatch script (SLURM) or the torchrun command (local) without submitting anything.
Needs the ``launch`` extra (``pip install -e .[launch]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INSTALL_HINT = (
    "pr2 launch needs nemo-run: pip install 'nemo-run==0.11.1' 'leptonai==0.27.3' "
    "(or this package's extra: pip install -e '.[launch]')"
)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env expects KEY=VALUE, got {text!r}")
    return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    from megatron_pr2.commands.overrides import add_parser_with_overrides

    p = add_parser_with_overrides(
        subparsers, "launch", help="run the trainer through nemo-run (local or SLURM)"
    )
    p.add_argument("recipe", help="recipe YAML (examples/recipes/...) or a trainer config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (also after flags)")
    p.add_argument("--variant", action="append", default=[], help="named recipe variant")
    p.add_argument("--executor", choices=("local", "slurm"), help="cluster.executor")
    p.add_argument("--nodes", type=int, help="cluster.nodes")
    p.add_argument("--gpus-per-node", type=int, help="cluster.gpus_per_node (0: CPU job)")
    p.add_argument("--nproc-per-node", type=int, help="torchrun processes per node")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", help="SLURM time limit, [D-]HH:MM:SS")
    p.add_argument("--container-image", help="container image (pyxis/enroot)")
    p.add_argument("--container-mounts", action="append", help="SRC:DST[,SRC:DST...] (repeatable)")
    p.add_argument("--env", action="append", type=_env_pair, help="KEY=VALUE (repeatable)")
    p.add_argument("--job-dir", help="nemo-run home on a shared file system")
    p.add_argument("--job-name", help="experiment name (default: pr2-<recipe>)")
    p.add_argument("--entry", choices=("auto", "pr2", "examples"), help="cluster.entry")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument(
        "--wait", action="store_true", help="block until the job ends (exit 1 if not OK)"
    )
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="--wait limit, seconds")
    p.add_argument("--skip-check", action="store_true", help="do not run check-recipe first")
    p.set_defaults(handler=run)


def _flags(args: argparse.Namespace) -> dict:
    mounts = None
    if args.container_mounts:
        mounts = [m for item in args.container_mounts for m in item.split(",") if m]
    return {
        "executor": args.executor,
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "nproc_per_node": args.nproc_per_node,
        "partition": args.partition,
        "account": args.account,
        "time": args.time,
        "container_image": args.container_image,
        "container_mounts": mounts,
        "env": dict(args.env) if args.env else None,
        "job_dir": args.job_dir,
        "job_name": args.job_name,
        "entry": args.entry,
    }


def run(args: argparse.Namespace) -> int:
    from megatron_pr2.launch.spec import cluster_from_section
    from megatron_pr2.recipes.check import check_recipe, format_result
    from megatron_pr2.recipes.loader import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, args.variant)
        spec = cluster_from_section(recipe.section("cluster"), _flags(args))
    except (RecipeError, ValueError, TypeError) as exc:
        print(f"pr2 launch: {exc}", file=sys.stderr)
        return 2
    if not args.skip_check:
        # a dry run only prints the job: unconverted weights are a warning there
        missing = "warn" if args.dryrun else "error"
        result = check_recipe(recipe, _flags(args), missing_weights=missing)
        if not result.ok:
            print(format_result(recipe, result), file=sys.stderr)
            return 1
        for message in result.warnings:
            print(f"pr2 launch: warning: {message}", file=sys.stderr)
    try:
        import nemo_run  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from megatron_pr2.launch.nemo import (
        LaunchError,
        job_logs,
        job_status,
        launch,
        nemo_run_home,
        output_dirs,
        wait_for_job,
    )

    name = spec.job_name or f"pr2-{Path(args.recipe).parent.name}-{Path(args.recipe).stem}"
    try:
        local = spec.executor == "local"
        out = launch(recipe, spec, name=name, dryrun=args.dryrun, detach=not local, tail_logs=local)
    except RecipeError as exc:
        print(f"pr2 launch: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:  # e.g. sbatch: invalid partition: one line, no traceback
        print(f"pr2 launch: {exc}", file=sys.stderr)
        return 1
    dirs = output_dirs(out.config_path)
    where = f"metrics {dirs['log_dir']}/metrics.jsonl, checkpoints {dirs['checkpoint_dir']}"
    if args.dryrun:
        print(out.script)
        print(f"# trainer config: {out.config_path}\n# {where}", file=sys.stderr)
        return 0
    print(f"experiment {out.exp_id}  (trainer config {out.config_path})")
    print(f"  {where}")
    if not args.wait:
        return 0
    home = nemo_run_home(spec)
    try:
        status = wait_for_job(out.exp_id, home, timeout_s=args.timeout)
    except TimeoutError as exc:
        print(f"pr2 launch: {exc} (--timeout); the job keeps running", file=sys.stderr)
        return 1
    job_id = job_status(out.exp_id, home).get("job_id")
    print(f"experiment {out.exp_id}: {status}" + (f" (job {job_id})" if job_id else ""))
    if status == "SUCCEEDED":
        return 0
    logs = job_logs(home, out.exp_id)
    for path in logs:
        print(f"  log: {path}")
    if not logs:
        print(f"  no log file under {home / 'experiments'} for {out.exp_id}")
    return 1
