"""Ctrl-C during ``pr2 convert`` exits 130 and leaves no output, partial or committed."""

from __future__ import annotations

import importlib.util
import pathlib
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
