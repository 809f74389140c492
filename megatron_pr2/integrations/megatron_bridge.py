"""Megatron-Bridge model providers with our replay routers (R2/R3 through one provider field).

A Megatron-Bridge user builds the model from a provider
(``AutoBridge.from_hf_pretrained(path).to_megatron_provider()``); the provider's
``transformer_layer_spec`` (a spec, or a callable the provider calls with itself) decides the
routers. :func:`use_replay_router` wraps that field in :func:`~megatron_pr2.patch.with_replay_router`,
so every MoE router the provider builds is a ``ReplayTopKRouter`` whose ``router.router_replay``
is a megatron ``RouterReplay`` (native calls and ``ReplaySession`` both work)::

    provider = AutoBridge.from_hf_pretrained(path).to_megatron_provider(load_weights=True)
    use_replay_router(provider, RouterReplayConfig(mode="r3"))
    provider.finalize()
    model = provider.provide_distributed_model(...)

The bridge loads HF weights by module class name and knows ``TopKRouter``, not our subclass:
:func:`use_replay_router` registers ``ReplayTopKRouter`` as replicated (as ``TopKRouter`` is),
without which loading fails with "Cannot determine parallelism type". Checked on CPU with
megatron-bridge 0.6.2 / megatron-core 0.19.2 by ``tools/bridge_replay_check.py`` (r3).

Not supported: ``mode="pr2"`` with the bridge loading HF weights (``load_weights=True``).
The predictor weight has no HF tensor, and megatron-bridge 0.6.2's loader leaves an empty
conversion task for an unmapped parameter and then fails on it (``AttributeError: 'NoneType'
object has no attribute 'megatron_module'`` in ``load_weights_hf_to_megatron``). Convert with
``pr2 convert hf-to-mcore`` for pr2, or load r2/r3 weights through the bridge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch import with_replay_router
from megatron_pr2.patch.router import ReplayTopKRouter


def replay_layer_spec(base_spec: Any, replay_config: RouterReplayConfig | None = None) -> Any:
    """``base_spec`` (a spec, or a provider's spec callable) with our routers.

    A callable keeps its signature (the bridge passes ``vp_stage`` only to callables that
    declare it), and is called per model build, so the bridge's own spec logic still runs.
    """
    if isinstance(base_spec, ModuleSpec) or not callable(base_spec):  # as the bridge tells
        return with_replay_router(base_spec, replay_config)

    @functools.wraps(base_spec)
    def spec(config: Any, *args: Any, **kwargs: Any) -> Any:
        return with_replay_router(base_spec(config, *args, **kwargs), replay_config)

    return spec


def register_replay_router() -> None:
    """Tell the bridge's weight mapping that ``ReplayTopKRouter`` weights are replicated over
    tensor parallelism (as those of megatron's ``TopKRouter``). Idempotent."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    AutoMapping.register_module_type(ReplayTopKRouter.__name__, "replicated")


def use_replay_router(
    provider: Any,
    replay_config: RouterReplayConfig | None = None,
    base_spec: Callable[..., Any] | Any | None = None,
) -> Any:
    """Make ``provider`` (a bridge ``GPTModelProvider``) build our routers; returns it.

    ``base_spec``: the spec to wrap (default: the provider's current
    ``transformer_layer_spec``; pass e.g. the bridge's ``local_layer_spec`` to build without
    Transformer Engine). Call before ``provide``/``provide_distributed_model``.
    """
    register_replay_router()
    spec = provider.transformer_layer_spec if base_spec is None else base_spec
    provider.transformer_layer_spec = replay_layer_spec(spec, replay_config)
    return provider
