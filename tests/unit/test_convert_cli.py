"""``tools/convert_checkpoint.py`` (``pr2 convert`` with the CPU launcher), world 1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from megatron_pr2.convert.safetensors_io import iter_tensors
from tests.support.hf_models import build_hf_model, save

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_round_trip_and_clean_errors(world1, tmp_path, capsys):
    tool = _tool()
    save(build_hf_model("olmoe"), tmp_path / "hf", fused=True)
    assert (
        tool.main(["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "mc"), "--no-progress"]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    back = tmp_path / "back"
    args = ["mcore-to-hf", str(tmp_path / "mc"), str(back), "--expert-layout", "fused"]
    assert tool.main([*args, "--no-progress"]) == 0
    original, converted = dict(iter_tensors(tmp_path / "hf")), dict(iter_tensors(back))
    assert sorted(original) == sorted(converted)
    assert all(torch.equal(original[k], converted[k]) for k in original)

    capsys.readouterr()
    bad = ["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "x"), "--ep", "3"]
    assert tool.main(bad) == 1
    assert "num_experts=8 is not divisible by ep=3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert tool.main([*args]) == 1  # exists, no --overwrite
    assert "output exists" in capsys.readouterr().err
