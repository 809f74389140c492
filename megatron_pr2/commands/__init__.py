"""Subcommands of ``pr2``: one module per command, each with ``register(subparsers)``.

A module registers its parser and sets ``handler`` (a ``Callable[[argparse.Namespace], int | None]``)
as the parser default. Heavy imports (torch, megatron) happen inside the handler so that
``pr2 --help`` stays fast and works without megatron-core installed.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "megatron_pr2.commands.info",
    "megatron_pr2.commands.convert",
    "megatron_pr2.commands.train",
    "megatron_pr2.commands.compare",
    "megatron_pr2.commands.analyze",
    "megatron_pr2.commands.check_recipe",
    "megatron_pr2.commands.launch",
    "megatron_pr2.commands.smoke_assets",
)
