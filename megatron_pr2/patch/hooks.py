"""Patch point 3, for vendored megatron only: the router hook that ``patches/`` adds to MoELayer.

Teams that vendor Megatron-LM apply ``patches/megatron-core-<version>/`` instead of passing their
spec through :func:`~megatron_pr2.patch.spec.with_replay_router`. The patched ``MoELayer``
builds its router with :func:`build_router` instead of calling ``submodules.router`` itself, so
the decision (and every line of replay logic) stays in this package and the patch stays a few
lines long.

The hook does nothing until it is enabled, in code with :func:`enable_router_hook` or the
:func:`router_hook` context manager, or for a whole process with
``MEGATRON_PR2_ROUTER_REPLAY=<mode>`` (``r2``, ``r3``, ``pr2``; ``none`` = off). Code wins over
the environment. When enabled, every stock ``TopKRouter`` is built as a ``ReplayTopKRouter``, as
``with_replay_router`` would have put it into the spec. Unpatched megatron never calls this module,
so enabling the hook there would silently build stock routers: ``enable_router_hook`` /
``router_hook`` raise instead, and the environment variable warns (once, when this module is
imported), naming the missing patch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.moe.router import TopKRouter

from megatron_pr2.config import ReplayMode, RouterReplayConfig
from megatron_pr2.patch.router import ReplayTopKRouter
from megatron_pr2.patch.version import megatron_core_version

#: Environment variable that enables the hook for a whole process (value: a replay mode).
ENV_VAR = "MEGATRON_PR2_ROUTER_REPLAY"


@dataclass(frozen=True)
class RouterHookSetting:
    """What the hook builds: the replay configuration and the router class it is given to."""

    replay_config: RouterReplayConfig
    router_cls: type = ReplayTopKRouter


_registered: RouterHookSetting | None = None


def megatron_is_patched() -> bool:
    """Whether the imported megatron-core carries ``patches/`` (its ``MoELayer`` module then
    defines the ``_build_router`` helper that calls :func:`build_router`)."""
    from megatron.core.transformer.moe import moe_layer

    helper = getattr(moe_layer, "_build_router", None)
    return callable(helper) and "_build_router" in moe_layer.MoELayer.__init__.__code__.co_names


def missing_patch_message(how: str) -> str:
    """Why the hook cannot work here, and the patch that would make it work."""
    from megatron.core.transformer.moe import moe_layer

    version = megatron_core_version()
    return (
        f"megatron-pr2 router hook enabled ({how}), but the imported megatron-core {version} "
        f"({moe_layer.__file__}) does not carry patches/megatron-core-{version}/"
        "0001-moe-layer-router-hook.patch, so its MoE layers would build stock routers and "
        "nothing would be replayed. Apply the patch (patches/README.md), or pass the layer spec "
        "through megatron_pr2.patch.with_replay_router instead."
    )


def _require_patched_megatron() -> None:
    if not megatron_is_patched():
        raise RuntimeError(missing_patch_message("enable_router_hook / router_hook"))


def _warn_if_env_enables_unpatched() -> None:
    """Import-time check of ``MEGATRON_PR2_ROUTER_REPLAY`` (no code path runs on unpatched
    megatron later, so this is the one place it can be noticed)."""
    value = os.environ.get(ENV_VAR, "").strip()
    try:
        enabled = bool(value) and RouterReplayConfig(mode=ReplayMode.parse(value)).enabled
    except ValueError:
        return  # a bad value is reported when the patched MoELayer reads it
    if enabled and not megatron_is_patched():
        warnings.warn(missing_patch_message(f"{ENV_VAR}={value}"), RuntimeWarning, stacklevel=2)


def enable_router_hook(
    replay_config: RouterReplayConfig, router_cls: type = ReplayTopKRouter
) -> None:
    """Build every MoE router created from now on as ``router_cls`` (patched megatron only:
    raises ``RuntimeError`` naming the missing patch otherwise)."""
    global _registered
    if replay_config.enabled:
        _require_patched_megatron()
    if not (isinstance(router_cls, type) and issubclass(router_cls, ReplayTopKRouter)):
        raise TypeError(f"router_cls must subclass ReplayTopKRouter, got {router_cls!r}")
    _registered = RouterHookSetting(replay_config, router_cls)


def disable_router_hook() -> None:
    """Forget the setting made in code (``MEGATRON_PR2_ROUTER_REPLAY`` still applies)."""
    global _registered
    _registered = None


@contextlib.contextmanager
def router_hook(
    replay_config: RouterReplayConfig, router_cls: type = ReplayTopKRouter
) -> Iterator[None]:
    """Enable the hook while the model is built; the previous setting comes back afterwards.

    Scoping it to the build keeps other models of the process (e.g. an inference copy) stock.
    """
    global _registered
    previous = _registered
    enable_router_hook(replay_config, router_cls)
    try:
        yield
    finally:
        _registered = previous


def active_setting() -> RouterHookSetting | None:
    """The setting the next router build will use, or ``None`` when the hook is off."""
    setting = _registered
    if setting is None:
        value = os.environ.get(ENV_VAR, "").strip()
        if not value:
            return None
        setting = RouterHookSetting(RouterReplayConfig(mode=ReplayMode.parse(value)))
    return setting if setting.replay_config.enabled else None


def _built_class(builder: Any) -> Any:
    """The class a router builder (a class, or a ``functools.partial`` of one) instantiates."""
    while isinstance(builder, functools.partial):
        builder = builder.func
    return builder


def router_builder_for(builder: Callable[..., Any], is_mtp_layer: bool = False) -> Callable:
    """The router builder the patched ``MoELayer`` should call instead of ``builder``.

    Raises ``ValueError`` when the hook is on but the spec asks for a router it cannot replace
    (replay would otherwise be silently off for that layer).
    """
    setting = active_setting()
    built = _built_class(builder)
    if setting is None or is_mtp_layer:  # MTP routers stay native, as with with_replay_router
        return builder
    if isinstance(built, type) and issubclass(built, ReplayTopKRouter):
        return builder  # the spec already went through with_replay_router
    if built is not TopKRouter:
        raise ValueError(
            f"megatron-pr2 router hook is on ({ENV_VAR} or enable_router_hook) but this MoE "
            f"layer's spec builds {getattr(built, '__qualname__', built)!r}, not megatron's "
            "TopKRouter; it cannot be replayed. Scope the hook with router_hook(...) to the "
            "model that trains with replay."
        )
    return functools.partial(setting.router_cls, replay_config=setting.replay_config)


def build_router(builder: Callable[..., Any], **kwargs: Any) -> Any:
    """Called by the patched ``MoELayer.__init__`` in place of ``builder(**kwargs)``."""
    return router_builder_for(builder, bool(kwargs.get("is_mtp_layer", False)))(**kwargs)


_warn_if_env_enables_unpatched()
