"""``patches/``: the source diffs for vendored megatron-core, and the hook they call.

Each lane runs its own version's patch set for real: a copy of the installed megatron-core is
patched (dry run first, then for real) and the replay checks in
``tests/support/patched_gpt_checks.py`` run against it in a subprocess, so this process keeps
importing the pristine package. The other lane's version is skipped here only because it is not
installed in this lane.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from packaging.version import Version

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch import hooks
from megatron_pr2.patch.router import ReplayTopKRouter
from megatron_pr2.patch.version import TESTED_VERSIONS, megatron_core_version
from tests.support import patched_core as pc

VERSIONS = [str(v) for v in TESTED_VERSIONS]


def _require_installed(version: str) -> None:
    installed = megatron_core_version()
    if installed != Version(version):
        pytest.skip(
            f"megatron-core {version} is not installed in this lane (installed: {installed}); "
            f"the lane that installs {version} applies and tests this patch set"
        )


def test_there_is_a_patch_set_for_every_tested_version_and_no_other():
    assert pc.patched_versions() == sorted(VERSIONS)
    for version in VERSIONS:
        patches = pc.patch_files(version)
        assert patches, f"patches/megatron-core-{version}/ has no .patch file"
        for patch in patches:
            touched = pc.touched_files(patch)
            assert touched, f"{patch.name}: no '+++ b/<path>' line"
            for path in touched:  # relative to the package root, so -p1 inside megatron/core
                assert not path.startswith(("megatron/", "core/")), (patch.name, path)


@pytest.mark.parametrize("version", VERSIONS)
def test_patch_set_still_applies_to_pristine_megatron_core(version, tmp_path):
    """Fails, naming the file and hunk, when upstream drift breaks a patch."""
    _require_installed(version)
    core = tmp_path / "megatron" / "core"
    pc.copy_touched_files(version, core)
    for patch in pc.patch_files(version):
        result = pc.apply_patch(patch, core, dry_run=True)
        assert result.ok, result.explain()
        result = pc.apply_patch(patch, core, dry_run=False)  # so the next patch sees this one
        assert result.ok, result.explain()


@pytest.mark.parametrize("version", VERSIONS)
def test_readme_command_for_a_megatron_lm_checkout_applies(version, tmp_path):
    """``git apply --directory=megatron/core`` from the root of a Megatron-LM-shaped checkout."""
    _require_installed(version)
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pc.copy_touched_files(version, tmp_path / "megatron" / "core")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for patch in pc.patch_files(version):
        done = subprocess.run(
            ["git", "apply", "--check", "--directory=megatron/core", str(patch)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_patched_megatron_core_passes_the_replay_checks(version, tmp_path):
    _require_installed(version)
    core = pc.copy_installed_core(tmp_path)
    for patch in pc.patch_files(version):
        result = pc.apply_patch(patch, core, dry_run=True)
        assert result.ok, result.explain()
        result = pc.apply_patch(patch, core, dry_run=False)
        assert result.ok, result.explain()
    done = pc.run_checks(tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-3000:]


# ------------------------------------------------------------------ the hook (no patch needed)
class _CustomRouter:
    pass


@pytest.fixture
def hook_off(monkeypatch):
    """Hook off, and the installed (pristine) megatron-core taken for a patched one, so the
    hook's own logic can be tested here; the unpatched refusal has its own tests below."""
    monkeypatch.delenv(hooks.ENV_VAR, raising=False)
    monkeypatch.setattr(hooks, "megatron_is_patched", lambda: True)
    hooks.disable_router_hook()
    yield
    hooks.disable_router_hook()


def test_hook_is_off_by_default_and_returns_the_spec_builder(hook_off):
    from megatron.core.transformer.moe.router import TopKRouter

    assert hooks.active_setting() is None
    assert hooks.router_builder_for(TopKRouter) is TopKRouter
    assert hooks.router_builder_for(_CustomRouter) is _CustomRouter


def test_enabled_hook_swaps_only_megatrons_topk_router(hook_off):
    from megatron.core.transformer.moe.router import TopKRouter

    replay = RouterReplayConfig(mode="r3")
    with hooks.router_hook(replay):
        builder = hooks.router_builder_for(TopKRouter)
        assert isinstance(builder, functools.partial) and builder.func is ReplayTopKRouter
        assert builder.keywords == {"replay_config": replay}
        assert hooks.router_builder_for(TopKRouter, is_mtp_layer=True) is TopKRouter
        already = functools.partial(ReplayTopKRouter, replay_config=RouterReplayConfig(mode="r2"))
        assert hooks.router_builder_for(already) is already  # with_replay_router's spec wins
        with pytest.raises(ValueError, match=r"_CustomRouter.*not megatron's TopKRouter"):
            hooks.router_builder_for(_CustomRouter)
    assert hooks.active_setting() is None


def test_environment_variable_enables_the_hook_and_code_wins(hook_off, monkeypatch):
    monkeypatch.setenv(hooks.ENV_VAR, "pr2")
    assert hooks.active_setting().replay_config.uses_predictor
    with hooks.router_hook(RouterReplayConfig(mode="none")):
        assert hooks.active_setting() is None  # explicit "none" in code turns it off
    monkeypatch.setenv(hooks.ENV_VAR, "off")
    assert hooks.active_setting() is None
    monkeypatch.setenv(hooks.ENV_VAR, "r5")
    with pytest.raises(ValueError, match="unknown mode 'r5'"):
        hooks.active_setting()


def test_router_class_must_be_a_replay_router(hook_off):
    with pytest.raises(TypeError, match="must subclass ReplayTopKRouter"):
        hooks.enable_router_hook(RouterReplayConfig(mode="r2"), router_cls=_CustomRouter)


def test_build_router_passes_every_keyword_to_the_builder(hook_off):
    seen = {}

    def builder(**kwargs):
        seen.update(kwargs)
        return "router"

    assert hooks.build_router(builder, config="c", pg_collection=None, is_mtp_layer=True) == (
        "router"
    )
    assert seen == {"config": "c", "pg_collection": None, "is_mtp_layer": True}


# ------------------------------------------------------------------ unpatched megatron
def test_installed_megatron_core_is_not_patched():
    """What the refusal tests below rely on (the patched copy is only ever imported by the
    subprocess of test_patched_megatron_core_passes_the_replay_checks)."""
    assert hooks.megatron_is_patched() is False


@pytest.mark.parametrize("enable", ["router_hook", "enable_router_hook"])
def test_enabling_the_hook_on_unpatched_megatron_names_the_missing_patch(enable, monkeypatch):
    monkeypatch.delenv(hooks.ENV_VAR, raising=False)
    hooks.disable_router_hook()
    version = megatron_core_version()
    message = rf"patches/megatron-core-{version}/0001-moe-layer-router-hook\.patch"
    with pytest.raises(RuntimeError, match=message):
        if enable == "router_hook":
            with hooks.router_hook(RouterReplayConfig(mode="r2")):
                pass
        else:
            hooks.enable_router_hook(RouterReplayConfig(mode="pr2"))
    assert hooks.active_setting() is None  # nothing was registered
    with hooks.router_hook(RouterReplayConfig(mode="none")):  # "off" needs no patch
        assert hooks.active_setting() is None


def test_environment_variable_on_unpatched_megatron_warns_naming_the_patch(monkeypatch):
    monkeypatch.setenv(hooks.ENV_VAR, "r3")
    with pytest.warns(RuntimeWarning, match=rf"{hooks.ENV_VAR}=r3.*0001-moe-layer-router-hook"):
        hooks._warn_if_env_enables_unpatched()
    for quiet in ("none", "off", "", "r5"):  # off, unset, or reported where it is read
        monkeypatch.setenv(hooks.ENV_VAR, quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hooks._warn_if_env_enables_unpatched()


def test_environment_variable_warning_comes_once_at_import(tmp_path):
    """In a fresh interpreter: importing megatron_pr2.patch.hooks with the variable set warns
    once (a process imports the module once), before any model is built."""
    probe = (
        "import warnings, tests\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    import megatron_pr2.patch.hooks\n"
        "    import megatron_pr2.patch.hooks\n"
        "hits = [w for w in seen if '0001-moe-layer-router-hook' in str(w.message)]\n"
        "print('HITS', len(hits))\n"
    )
    env = {**os.environ, hooks.ENV_VAR: "pr2", "PYTHONPATH": str(pc.REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=pc.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HITS 1" in done.stdout, done.stdout + done.stderr[-3000:]


# ------------------------------------------------------------------ canaries for patch point 3
def test_stock_moe_spec_builds_megatrons_topk_router():
    """The hook swaps exactly ``TopKRouter``; a new default router class would make it refuse."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    fields = {f.name: f for f in dataclasses.fields(MoESubmodules)}
    assert fields["router"].default is TopKRouter


def test_moe_layer_passes_is_mtp_layer_to_its_router_from_0_19():
    """0.19 tells MoELayer about MTP (the hook keeps MTP routers native); 0.16.1 cannot."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    has_flag = "is_mtp_layer" in inspect.signature(MoELayer.__init__).parameters
    assert has_flag == (megatron_core_version() >= Version("0.19"))
