"""Everything that knows megatron-core internals, one module per patch point.

* ``router``: ``ReplayTopKRouter`` fills megatron's ``TopKRouter.router_replay`` hook.
* ``spec``: ``with_replay_router`` injects it through ``MoESubmodules.router``.
* ``guards``: configurations that would bypass the hook are refused.
* ``version``: tested megatron-core versions (0.16.1, 0.19.2).
* ``compat``: megatron-core bugs that stop a run on a supported version (0.16's unbound
  ``te_general_gemm`` without Transformer Engine).
* ``hooks``: what a megatron-core patched with ``patches/`` calls to build its routers (its
  canaries are in ``tests/unit/test_patches.py``).

Each patch point has a canary in ``tests/unit/test_patch_points.py``.
"""

from megatron_pr2.patch.compat import apply_compat_fixes
from megatron_pr2.patch.guards import check_replay_compatible
from megatron_pr2.patch.hooks import disable_router_hook, enable_router_hook, router_hook
from megatron_pr2.patch.router import ReplayTopKRouter
from megatron_pr2.patch.spec import replay_router_builder, with_replay_router
from megatron_pr2.patch.version import check_megatron_core_version, megatron_core_version

__all__ = [
    "ReplayTopKRouter",
    "apply_compat_fixes",
    "check_megatron_core_version",
    "check_replay_compatible",
    "disable_router_hook",
    "enable_router_hook",
    "megatron_core_version",
    "replay_router_builder",
    "router_hook",
    "with_replay_router",
]
