"""Recipe files: trainer YAML plus launch-only sections, with ``defaults`` inheritance.

A recipe is a trainer config (NeMo-RL key layout, :mod:`megatron_pr2.rl.config`) that may also
carry sections only ``pr2 launch`` and ``pr2 check-recipe`` read:

* ``defaults: [base.yaml, ...]``: files (relative to this one) deep-merged first, in order, so a
  mode file only states what differs from the model's base file;
* ``model:`` which Hugging Face model it is (``name``, ``hf_config``: the shape), where its
  converted weights are (``checkpoint``, from ``hf_path`` by ``pr2 convert hf-to-mcore``; the
  trainer's ``policy.model_path``), or ``random_init: true`` for smoke runs;
* ``cluster:`` nodes, GPUs, executor and SLURM settings (see :mod:`megatron_pr2.launch.spec`);
* ``variants:`` named sets of dotted overrides (``off4: {grpo.off_policy_steps: 4, ...}``),
  picked with ``--variant``; they apply after the file and before command-line overrides.

``data:`` is trainer config (:class:`megatron_pr2.rl.data.DataConfig`): the dataset files, their
columns and the reward.

Relative input paths (:data:`INPUT_PATH_KEYS`: the model's folders, the data files) resolve
against the folder of the file that sets them; on the command line, against the current one.

These sections are removed before the trainer sees the config: :func:`trainer_values`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from megatron_pr2.rl.config import MasterConfig

__all__ = [
    "INPUT_PATH_KEYS",
    "LAUNCH_SECTIONS",
    "PARALLEL_KEYS",
    "Recipe",
    "RecipeError",
    "deep_merge",
    "load_recipe",
    "resolve_input_paths",
    "run_config",
    "trainer_values",
    "unsupported_parallel_keys",
]

LAUNCH_SECTIONS = ("defaults", "model", "cluster", "variants")

# NeMo-RL names of the policy's parallel sizes, with the value that means "not used".
PARALLEL_KEYS: dict[str, Any] = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "context_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "sequence_parallel": False,
}


class RecipeError(ValueError):
    """A recipe that cannot be loaded or does not fit its model or cluster."""


@dataclass
class Recipe:
    """A resolved recipe: ``values`` holds every section, ``path`` where it came from."""

    path: Path | None
    values: dict[str, Any]
    variants_applied: list[str] = field(default_factory=list)

    def section(self, name: str) -> dict[str, Any]:
        value = self.values.get(name) or {}
        if not isinstance(value, dict):
            raise RecipeError(f"{name}: expected a mapping, got {value!r}")
        return value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursing into mappings; lists and scalars are replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Input paths (not outputs: logger.log_dir / checkpointing.checkpoint_dir resolve in the job
# dir, megatron_pr2.launch.nemo): relative ones resolve against the file that sets them.
INPUT_PATH_KEYS = (
    "model.checkpoint",
    "model.hf_path",
    "model.hf_config",
    "data.train_files",
    "data.val_files",
    "policy.model_path",
    "policy.tokenizer.name",
)


def _absolute(value: Any, base: Path) -> Any:
    """``value`` (a path or a list of them) with relative entries joined to ``base``."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return value if path.is_absolute() else str((base / path).resolve())


def _resolve_dotted(values: dict[str, Any], key: str, base: Path) -> None:
    node: Any = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and node.get(parts[-1]) is not None:
        node[parts[-1]] = _absolute(node[parts[-1]], base)


def resolve_input_paths(values: dict[str, Any], base: Path) -> None:
    """Make the :data:`INPUT_PATH_KEYS` of one file (and of its variants) absolute from
    ``base``, its folder: a recipe names its checkpoint and data next to itself or absolutely,
    and means the same files whichever directory ``pr2`` runs in (the job's working directory
    is not the launching one)."""
    for key in INPUT_PATH_KEYS:
        _resolve_dotted(values, key, base)
    variants = values.get("variants")
    if isinstance(variants, dict):
        for body in variants.values():
            if isinstance(body, dict):
                for key in INPUT_PATH_KEYS:
                    if body.get(key) is not None:
                        body[key] = _absolute(body[key], base)


def _read(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise RecipeError(f"{path}: defaults form a cycle ({chain})")
    if not path.is_file():
        where = f" (a default of {stack[-1]})" if stack else ""
        raise RecipeError(f"{path}: no such recipe file{where}")
    loaded = yaml.safe_load(path.read_text())
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: top level must be a mapping")
    resolve_input_paths(loaded, path.parent)
    defaults = loaded.pop("defaults", None) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise RecipeError(f"{path}: defaults must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in defaults:
        merged = deep_merge(merged, _read(path.parent / str(name), (*stack, path)))
    return deep_merge(merged, loaded)


def _set_dotted(values: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"{where}: {key!r} is not a dotted key")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: {part!r} in {key!r} is not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def load_recipe(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    variants: Sequence[str] = (),
) -> Recipe:
    """Read ``path`` (with its ``defaults``), apply ``variants`` then ``a.b=value`` overrides."""
    recipe_path = Path(path) if path is not None else None
    values = _read(recipe_path, ()) if recipe_path is not None else {}
    known = values.get("variants") or {}
    if not isinstance(known, dict):
        raise RecipeError("variants: expected a mapping of name -> {dotted.key: value}")
    for name in variants:
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise RecipeError(f"unknown variant {name!r}; this recipe has: {choices}")
        body = known[name] or {}
        if not isinstance(body, dict):
            raise RecipeError(f"variants.{name}: expected a mapping of dotted keys")
        for key, value in body.items():
            _set_dotted(values, str(key), value, f"variants.{name}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not of the form a.b.c=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if key.strip() in INPUT_PATH_KEYS:  # a path typed on the command line: from the cwd
            value = _absolute(value, Path.cwd())
        _set_dotted(values, key.strip(), value, item)
    return Recipe(recipe_path, values, list(variants))


def _trainer_policy_fields() -> set[str]:
    from megatron_pr2.rl.config import PolicyConfig

    return {f.name for f in dataclasses.fields(PolicyConfig)}


def unsupported_parallel_keys(recipe: Recipe) -> list[str]:
    """``policy.*`` parallel sizes set to a used value that this checkout's trainer lacks."""
    policy = recipe.section("policy")
    supported = _trainer_policy_fields()
    return [
        f"policy.{key}={policy[key]!r}"
        for key, unused in PARALLEL_KEYS.items()
        if key in policy and key not in supported and policy[key] not in (unused, 1, None, False)
    ]


def _model_into_policy(model: Mapping[str, Any], policy: dict[str, Any]) -> None:
    """``model:`` -> the trainer's model keys: ``model.checkpoint`` (the ``pr2 convert``
    output) becomes ``policy.model_path``; ``model.random_init: true`` (smoke runs) builds
    ``model.hf_path``'s (or ``model.hf_config``'s) architecture with random weights. Keys set
    under ``policy`` win."""
    if not isinstance(policy, dict) or policy.get("model_path") or policy.get("random_init_from"):
        return
    if model.get("random_init"):
        source = model.get("hf_path") or model.get("hf_config")
        if not source:
            raise RecipeError(
                "model.random_init: true needs model.hf_path or model.hf_config (a local folder "
                "with the model's config.json) to take the architecture from"
            )
        policy["random_init_from"] = str(source)
    elif model.get("checkpoint"):
        policy["model_path"] = str(model["checkpoint"])


def trainer_values(recipe: Recipe, strict: bool = True) -> dict[str, Any]:
    """The config the trainer gets: launch-only sections removed.

    Parallel sizes the trainer in this checkout does not know yet are dropped when they hold
    their "not used" value and refused otherwise (``strict``), so a launch never silently
    ignores a layout; ``strict=False`` drops them all (to validate the rest of the config).
    """
    values = {k: copy.deepcopy(v) for k, v in recipe.values.items() if k not in LAUNCH_SECTIONS}
    _model_into_policy(recipe.section("model"), values.setdefault("policy", {}))
    policy = values.get("policy")
    if isinstance(policy, dict):
        supported = _trainer_policy_fields()
        for key, unused in PARALLEL_KEYS.items():
            if key in policy and key not in supported:
                if not strict or policy[key] in (unused, 1, None, False):
                    del policy[key]
                else:
                    raise RecipeError(
                        f"policy.{key}={policy[key]!r}: the trainer in this checkout does not "
                        "support this parallel size yet (megatron_pr2.rl.config.PolicyConfig)"
                    )
    return values


def is_recipe(path: str | Path) -> bool:
    """Whether ``path`` holds a recipe (a launch-only section at its top level) rather than
    a plain trainer config."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the trainer config loader names what is wrong with the file
    return isinstance(loaded, dict) and any(key in loaded for key in LAUNCH_SECTIONS)


def run_config(
    path: str | Path, overrides: Sequence[str] = (), variants: Sequence[str] = ()
) -> MasterConfig:
    """The trainer's config from ``path``: a recipe (its defaults, ``variants``, then the
    overrides; launch-only sections removed) or a plain trainer config.

    Why: ``examples/train.py`` and ``pr2 train`` run a recipe directly, without ``pr2 launch``
    (the README's main job is a recipe's ``tiny`` variant). Problems are ``ConfigError`` s,
    which the entry points print as one line."""
    from megatron_pr2.errors import ConfigError
    from megatron_pr2.rl.config import config_from_dict, load_config

    if not is_recipe(path):
        if variants:
            raise ConfigError(
                f"{path} is a trainer config, not a recipe: it has no variants "
                f"(asked for {', '.join(variants)})"
            )
        return load_config(path, overrides)
    try:
        return config_from_dict(trainer_values(load_recipe(path, overrides, variants)))
    except RecipeError as err:
        raise ConfigError(f"{path}: {err}") from None
