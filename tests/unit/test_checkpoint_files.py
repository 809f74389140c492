"""A damaged file of a megatron dist checkpoint is named in one line by every reader:
``pr2 convert mcore-to-hf`` and the trainer's ``load_checkpoint`` (resume shares it)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_pr2.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_pr2.errors import UserError
from megatron_pr2.models.checkpoint_files import CheckpointFileError, find_damaged_file
from tests.support.hf_models import build_hf_model, save

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _ten_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


def _zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


#: (file to damage, how, what the message must say about it)
DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "distcp-half": ("*.distcp", _half, r"truncated dist checkpoint file \(\d+ bytes"),
    "distcp-10-bytes": ("*.distcp", _ten_bytes, r"truncated dist checkpoint file \(10 bytes"),
    "distcp-zeroed": ("*.distcp", _zeroed, r"corrupt dist checkpoint file: tensor '.+' at bytes"),
    "metadata-half": (".metadata", _half, r"unreadable checkpoint metadata"),
    "common-zeroed": ("common.pt", _zeroed, r"truncated or corrupt torch\.save file"),
}


@pytest.fixture(scope="module")
def converted(megatron_world1, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    save(build_hf_model("qwen3_moe", seed=4), root / "hf")
    hf_to_mcore(root / "hf", root / "mcore", show_progress=False)
    return root / "mcore"


def _damaged_copy(converted: Path, tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    pattern, damage, says = DAMAGE[case]
    ckpt = tmp_path / "damaged"
    shutil.copytree(converted, ckpt)
    matches = sorted(ckpt.glob(pattern))
    if not matches:  # megatron-core 0.19 keeps the common state inside the .distcp files
        pytest.skip(f"this megatron-core writes no {pattern}")
    target = matches[-1]
    damage(target)
    return ckpt, target, rf"^{target}: {says}"


def test_an_intact_checkpoint_has_no_damaged_file(converted):
    assert find_damaged_file(converted) is None


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_mcore_to_hf_names_the_damaged_file(world1, tmp_path, converted, case, capsys):
    ckpt, target, match = _damaged_copy(converted, tmp_path, case)
    with pytest.raises(ConversionError, match=match) as info:
        mcore_to_hf(ckpt, tmp_path / "back", show_progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "back").exists()

    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    assert tool.main(["mcore-to-hf", str(ckpt), str(tmp_path / "back"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pr2 convert: error: {target}: "), err


@pytest.mark.parametrize("case", ["distcp-half", "distcp-zeroed", "metadata-half"])
def test_trainer_load_names_the_damaged_file(world1, tmp_path, converted, case):
    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.convert import (
        build_model_chunks_from_description,
        load_converted_model_description,
    )
    from megatron_pr2.models.training import load_checkpoint, setup_training

    ckpt, _, match = _damaged_copy(converted, tmp_path, case)
    description = load_converted_model_description(converted)
    chunks = build_model_chunks_from_description(description, RouterReplayConfig(mode="pr2"))
    setup = setup_training(chunks, lr=1e-3)
    with pytest.raises(CheckpointFileError, match=match) as info:
        load_checkpoint(setup, ckpt, load_optimizer=False)
    assert isinstance(info.value, UserError)  # pr2 prints it as one line, exit 2
    assert "\n" not in str(info.value)
