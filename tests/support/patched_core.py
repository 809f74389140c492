"""Apply ``patches/megatron-core-<version>/`` to a copy of the installed megatron-core.

Used by ``tests/unit/test_patches.py``. The installed package is never modified: patches go to
a copy, and the copy is imported only in a subprocess. GNU ``patch`` is used when present (what
the patches README tells vendoring teams to run); ``git apply`` otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCHES_DIR = REPO_ROOT / "patches"
#: The test file the subprocess runs against the patched copy.
CHECKS_FILE = Path(__file__).resolve().parent / "patched_gpt_checks.py"
#: Tells the checks where the patched ``megatron`` package lives (they skip without it).
PATCHED_ENV = "PR2_PATCHED_MEGATRON"


def patch_files(version: str) -> list[Path]:
    """The patch set of one megatron-core version, in apply order."""
    return sorted((PATCHES_DIR / f"megatron-core-{version}").glob("*.patch"))


def patched_versions() -> list[str]:
    return sorted(
        p.name.removeprefix("megatron-core-") for p in PATCHES_DIR.glob("megatron-core-*")
    )


def installed_core_dir() -> Path:
    """``megatron/core`` of the installed megatron-core (found without importing it)."""
    spec = importlib.util.find_spec("megatron.core")
    assert spec is not None and spec.submodule_search_locations, "megatron-core is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def touched_files(patch: Path) -> list[str]:
    """Package-root-relative paths a patch edits (its ``+++ b/...`` lines)."""
    return [
        match.group(1)
        for match in re.finditer(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.MULTILINE)
    ]


@dataclass
class ApplyResult:
    patch: Path
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def explain(self) -> str:
        """Which file and hunk failed, for the assertion message."""
        lines = self.output.splitlines()
        key = [
            line
            for line in lines
            if re.search(
                r"checking file|patching file|FAILED|Reversed|can't find|error|while search", line
            )
        ]
        hint = ""
        if "Reversed" in self.output or "previously applied" in self.output:
            hint = (
                "\n(the target already carries this patch: the installed megatron-core is not "
                "pristine; reinstall it)"
            )
        return (
            f"{self.patch.relative_to(REPO_ROOT)} does not apply (exit {self.returncode}):\n  "
            + "\n  ".join(key or lines)
            + hint
            + "\nRegenerate it against pristine sources (patches/README.md, 'Regenerating')."
        )


def apply_patch(patch: Path, core_dir: Path, dry_run: bool) -> ApplyResult:
    """Apply one patch inside ``core_dir`` (a ``megatron/core`` directory), strictly (no fuzz)."""
    if shutil.which("patch"):
        command = ["patch", "-p1", "--fuzz=0", "--forward", "--batch", "--no-backup-if-mismatch"]
        command += ["-d", str(core_dir), "-i", str(patch)]
        if dry_run:
            command.append("--dry-run")
    else:  # outside any git repository, git apply works relative to the working directory
        command = ["git", "apply", "-p1", "--verbose", str(patch)]
        if dry_run:
            command.append("--check")
    done = subprocess.run(command, cwd=core_dir, capture_output=True, text=True, check=False)
    return ApplyResult(patch, done.returncode, done.stdout + done.stderr)


def copy_touched_files(version: str, dest_core: Path) -> None:
    """Copy just the files the patch set edits (enough for a dry run)."""
    source = installed_core_dir()
    for patch in patch_files(version):
        for relative in touched_files(patch):
            target = dest_core / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, target)


def copy_installed_core(dest_root: Path) -> Path:
    """Copy the installed ``megatron/core`` to ``dest_root/megatron/core``; return that dir.

    ``megatron`` is a namespace package, so with ``dest_root`` first on ``sys.path`` the copy's
    ``megatron.core`` shadows the installed one.
    """
    dest_core = dest_root / "megatron" / "core"
    shutil.copytree(
        installed_core_dir(), dest_core, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return dest_core


def run_checks(dest_root: Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run :data:`CHECKS_FILE` with pytest in a fresh interpreter that imports the patched copy."""
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_PR2_ROUTER_REPLAY"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(dest_root), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env[PATCHED_ENV] = str(dest_root / "megatron")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    command.append(str(CHECKS_FILE))
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
