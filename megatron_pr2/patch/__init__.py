"""Everything that knows megatron-core internals, one module per patch point.

* ``router``: ``ReplayTopKRouter`` fills megatron's ``TopKRouter.router_replay`` hook.
* ``spec``: ``with_replay_router`` injects it through ``MoESubmodules.router``.
* ``guards``: configurations that would bypass the hook are refused.
* ``version``: tested megatron-core versions (0.16.1, 0.19.2).
* ``compat``: megatron-core bugs that stop a run on a supported version (0.16's unbound
  ``te_general_gemm`` without Transformer Engine).
* ``hooks``: what a megatron-core patched with ``patches/`` calls to build its routers (its
  canaries are in ``tests/unit/test_patches.py``).
* ``distrib_optim``: megatron-core bugs that stop the distributed optimizer with torch's Adam
  (no TE/apex) from resuming a checkpoint; repaired on the instance while it loads.
* ``float16_optim``: megatron-core's bf16 optimizer cannot checkpoint a model that also has fp32
  params (CPU norms, the PR2 predictor); a view in torch's param order while it saves/loads.

Each patch point has a canary in ``tests/unit/test_patch_points.py``.

Imports are lazy (PEP 562): ``import megatron_pr2.patch.version`` or ``pr2 info`` must not
import megatron-core (seconds, and its warnings) just to read a version number.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "ReplayTopKRouter": "megatron_pr2.patch.router",
    "apply_compat_fixes": "megatron_pr2.patch.compat",
    "check_megatron_core_version": "megatron_pr2.patch.version",
    "check_replay_compatible": "megatron_pr2.patch.guards",
    "disable_router_hook": "megatron_pr2.patch.hooks",
    "enable_router_hook": "megatron_pr2.patch.hooks",
    "fp32_params_as_main_params": "megatron_pr2.patch.float16_optim",
    "megatron_core_version": "megatron_pr2.patch.version",
    "replay_router_builder": "megatron_pr2.patch.spec",
    "router_hook": "megatron_pr2.patch.hooks",
    "torch_adam_loading": "megatron_pr2.patch.distrib_optim",
    "with_replay_router": "megatron_pr2.patch.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # also lets ``from megatron_pr2.patch import hooks`` import the module
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
