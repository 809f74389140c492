"""Which megatron-core this package was built and tested against."""

from __future__ import annotations

import warnings
from functools import lru_cache

from packaging.version import Version

#: Versions whose patch points the canary tests pin (both run in CI).
TESTED_VERSIONS = (Version("0.16.1"), Version("0.19.2"))
MINIMUM_VERSION = Version("0.16.0")


@lru_cache(maxsize=1)
def megatron_core_version() -> Version:
    from importlib.metadata import version

    return Version(version("megatron-core"))


def check_megatron_core_version() -> Version:
    """Refuse versions older than the replay hook; warn once on an untested newer one."""
    found = megatron_core_version()
    if found < MINIMUM_VERSION:
        raise RuntimeError(
            f"megatron-pr2 needs megatron-core >= {MINIMUM_VERSION} (the router replay hook); "
            f"found {found}"
        )
    if found not in TESTED_VERSIONS:
        tested = ", ".join(str(v) for v in TESTED_VERSIONS)
        warnings.warn(
            f"megatron-core {found} is untested with megatron-pr2 (tested: {tested}); "
            "run tests/unit/test_patch_points.py to check the patch points",
            stacklevel=2,
        )
    return found
