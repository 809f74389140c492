"""Patch point 4: megatron-core bugs that break a run outright on supported versions.

* megatron-core 0.16.x, without Transformer Engine: ``moe_utils`` imports ``te_general_gemm``
  inside a ``try`` and never binds the name when TE is missing, so the first router forward with
  ``moe_router_dtype`` set dies with ``NameError: name 'te_general_gemm' is not defined``
  (0.19 binds it to ``None``). Binding it to ``None`` selects megatron's own ``torch.mm`` path,
  exactly what 0.19 does. This hits GPU machines without TE as well as CPUs.

Each fix checks the exact condition it repairs and leaves a megatron-core without the bug
untouched; the canaries are in ``tests/unit/test_patch_points.py``.
"""

from __future__ import annotations

from packaging.version import Version

from megatron_pr2.patch.version import megatron_core_version

#: First megatron-core release that binds ``moe_utils.te_general_gemm`` without TE.
TE_GENERAL_GEMM_FIXED_IN = Version("0.19.0")


def bind_missing_te_general_gemm() -> bool:
    """Bind ``moe_utils.te_general_gemm = None`` where 0.16.x left it unbound; True if it did."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    if megatron_core_version() >= TE_GENERAL_GEMM_FIXED_IN:
        raise RuntimeError(
            f"megatron-core {megatron_core_version()}: moe_utils.te_general_gemm is unbound, "
            f"which megatron-pr2 only expects before {TE_GENERAL_GEMM_FIXED_IN}; "
            "run tests/unit/test_patch_points.py"
        )
    moe_utils.te_general_gemm = None
    return True


def apply_compat_fixes() -> None:
    """Every fix of this module; idempotent, cheap enough to call before each model build."""
    bind_missing_te_general_gemm()
