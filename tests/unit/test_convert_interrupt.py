"""Ctrl-C during ``pr2 convert`` exits 130 and leaves no output, partial or committed."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from megatron_pr2.convert import hf_to_mcore
from tests.support.hf_models import build_hf_model, save

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interrupt_on_call(monkeypatch, owner: type, name: str, call: int) -> dict:
    """Make ``owner.name`` raise KeyboardInterrupt (what SIGINT raises) on its ``call``-th use."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return calls


def _main(argv: list[str]) -> int:
    try:
        return _tool().main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped pr2 convert: no exit status, no cleanup")


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save(build_hf_model("mixtral"), tmp_path_factory.mktemp("hf") / "mixtral")


def test_interrupt_during_hf_to_mcore_exits_130_and_leaves_nothing(
    world1, tmp_path, hf_dir, monkeypatch, capsys
):
    from megatron_pr2.convert.mapping import HFToMegatron

    calls = _interrupt_on_call(monkeypatch, HFToMegatron, "load", 5)
    out = tmp_path / "mcore"
    code = _main(["hf-to-mcore", str(hf_dir), str(out), "--no-progress"])
    assert calls["n"] == 5  # it was mid-conversion
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    _assert_nothing_left(out)


def test_interrupt_during_mcore_to_hf_exits_130_and_leaves_nothing(
    world1, tmp_path, hf_dir, monkeypatch, capsys
):
    from megatron_pr2.convert.safetensors_io import ShardedSafetensorsWriter

    hf_to_mcore(hf_dir, tmp_path / "mcore", show_progress=False)
    calls = _interrupt_on_call(monkeypatch, ShardedSafetensorsWriter, "add", 20)
    out = tmp_path / "back"
    argv = ["mcore-to-hf", str(tmp_path / "mcore"), str(out), "--max-shard-size", "4096"]
    code = _main([*argv, "--no-progress"])
    assert calls["n"] == 20 and code == 130
    assert "interrupted" in capsys.readouterr().err
    _assert_nothing_left(out)


def test_interrupt_while_replacing_an_output_keeps_the_old_one(
    world1, tmp_path, hf_dir, monkeypatch
):
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "keep").write_text("old")
    real_rename = pathlib.Path.rename

    def rename(self, target):  # SIGINT between moving the old output away and the new in
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    code = _main(["hf-to-mcore", str(hf_dir), str(out), "--overwrite", "--no-progress"])
    assert code == 130
    assert (out / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore"]


_SIGINT_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from megatron_pr2.convert.mapping import HFToMegatron
real, calls = HFToMegatron.load, []
def load(self, ref):
    calls.append(ref)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends, mid-conversion
    return real(self, ref)
HFToMegatron.load = load
sys.argv = ["convert_checkpoint", "hf-to-mcore", {src!r}, {out!r}, "--no-progress"]
import runpy
runpy.run_path({tool!r}, run_name="__main__")
"""


@pytest.mark.slow  # a fresh process imports megatron-core: about a minute on 2 shared cores
def test_sigint_to_the_process_exits_130_and_leaves_nothing(tmp_path, hf_dir):
    import os
    import subprocess

    out = tmp_path / "mcore"
    root = str(TOOL.parents[1])
    script = _SIGINT_SCRIPT.format(root=root, src=str(hf_dir), out=str(out), tool=str(TOOL))
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted" in proc.stderr
    _assert_nothing_left(out)
