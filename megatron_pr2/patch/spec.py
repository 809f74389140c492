"""Patch point 2: put :class:`ReplayTopKRouter` into a GPT decoder spec (``MoESubmodules.router``).

megatron-core 0.16 builds MoE layers from ``ModuleSpec(module=MoELayer, submodules=...)``; 0.19
from ``functools.partial(MoELayer, submodules=...)``. Both are handled; the input spec is not
modified (a copy is returned), and MTP block specs are left alone (their routers stay native).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch.router import ReplayTopKRouter


def replay_router_builder(
    replay_config: RouterReplayConfig | None = None, router_cls: type = ReplayTopKRouter
) -> Callable[..., Any]:
    """The callable megatron calls as ``submodules.router(config=..., pg_collection=...)``."""
    return functools.partial(router_cls, replay_config=replay_config or RouterReplayConfig())


def _is_moe_layer(module: Any) -> bool:
    return isinstance(module, type) and issubclass(module, MoELayer)


def _rewrite(spec: Any, router: Callable[..., Any]) -> tuple[Any, int]:
    """Return (rewritten spec, number of MoE routers replaced)."""
    if isinstance(spec, MoESubmodules):
        return dataclasses.replace(spec, router=router), 1
    if isinstance(spec, functools.partial):
        if _is_moe_layer(spec.func) and "submodules" in spec.keywords:
            submodules, n = _rewrite(spec.keywords["submodules"], router)
            return functools.partial(
                spec.func, *spec.args, **{**spec.keywords, "submodules": submodules}
            ), n
        return spec, 0
    if isinstance(spec, ModuleSpec):
        if spec.submodules is None:
            return spec, 0
        submodules, n = _rewrite(spec.submodules, router)
        return (dataclasses.replace(spec, submodules=submodules), n) if n else (spec, 0)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        # TransformerBlockSubmodules (layer_specs list), TransformerLayerSubmodules (mlp field).
        return _rewrite_fields(spec, lambda item: _rewrite(item, router))
    return spec, 0


def _rewrite_fields(spec: Any, rewrite: Callable[[Any], tuple[Any, int]]) -> tuple[Any, int]:
    """``rewrite`` applied to every field of a spec dataclass (and to each item of a list
    field); returns (a copy with the changed fields, or ``spec`` itself, number of changes)."""
    changes: dict[str, Any] = {}
    total = 0
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if isinstance(value, list):
            rewritten = [rewrite(item) for item in value]
            count = sum(n for _, n in rewritten)
            if count:
                changes[field.name] = [s for s, _ in rewritten]
        else:
            new_value, count = rewrite(value)
            if count:
                changes[field.name] = new_value
        total += count
    return (dataclasses.replace(spec, **changes), total) if total else (spec, 0)


def with_replay_router(
    spec: Any,
    replay_config: RouterReplayConfig | None = None,
    router_cls: type = ReplayTopKRouter,
) -> Any:
    """Copy of a decoder-block / layer / MoE spec whose MoE routers are ``router_cls``.

    Raises ``ValueError`` if the spec has no MoE layer (a dense model has nothing to replay).
    """
    rewritten, count = _rewrite(spec, replay_router_builder(replay_config, router_cls))
    if count == 0:
        raise ValueError(f"no MoE layer found in spec {type(spec).__name__}; nothing to replay")
    return rewritten


def _with_layer_class(spec: Any, layer_cls: type) -> tuple[Any, int]:
    """Return (spec with every MoE layer built as ``layer_cls``, number of layers replaced)."""
    if isinstance(spec, functools.partial):  # 0.19: partial(MoELayer, submodules=...)
        if _is_moe_layer(spec.func):
            return functools.partial(layer_cls, *spec.args, **spec.keywords), 1
        return spec, 0
    if isinstance(spec, ModuleSpec):  # 0.16: ModuleSpec(module=MoELayer, ...)
        if _is_moe_layer(spec.module):
            return dataclasses.replace(spec, module=layer_cls), 1
        if spec.submodules is None:
            return spec, 0
        submodules, n = _with_layer_class(spec.submodules, layer_cls)
        return (dataclasses.replace(spec, submodules=submodules), n) if n else (spec, 0)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return _rewrite_fields(spec, lambda item: _with_layer_class(item, layer_cls))
    return spec, 0


def with_planned_dispatch(spec: Any) -> Any:
    """Copy of a decoder-block / layer / MoE spec whose MoE layers are
    :class:`~megatron_pr2.patch.dispatcher.ReplayMoELayer` (all-to-all sizes from a replay
    plan, see ``replay.dispatch_plan``). Composes with :func:`with_replay_router`."""
    from megatron_pr2.patch.dispatcher import ReplayMoELayer

    rewritten, count = _with_layer_class(spec, ReplayMoELayer)
    if count == 0:
        raise ValueError(f"no MoE layer found in spec {type(spec).__name__}; nothing to plan")
    return rewritten
