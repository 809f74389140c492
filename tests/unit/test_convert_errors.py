"""Bad input fails with a message naming the tensor, key or file, and leaves no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file

from megatron_pr2.convert import (
    ConversionError,
    ConvertLayout,
    hf_to_mcore,
    load_converted_model_description,
    mcore_to_hf,
)
from tests.support.hf_models import build_hf_model, save


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "qwen"
    save(build_hf_model("qwen3_moe"), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def _fails(src: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(ConversionError, match=match):
        hf_to_mcore(src, out, show_progress=False, **kwargs)
    _assert_nothing_left(out)


def test_missing_tensor_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_tensors(src, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    _fails(
        src,
        tmp_path / "out",
        r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'",
    )


def test_wrong_shape_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")

    def shrink(tensors):
        tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    _edit_tensors(src, shrink)
    _fails(
        src,
        tmp_path / "out",
        r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight': shape \[8, 32\]",
    )


def test_wrong_fused_expert_shape_is_named(world1, tmp_path):
    src = save(build_hf_model("olmoe"), tmp_path / "src", fused=True)

    def shrink(tensors):
        name = "model.layers.3.mlp.experts.down_proj"
        tensors[name] = tensors[name][:, :, :-1].contiguous()

    _edit_tensors(src, shrink)
    _fails(src, tmp_path / "out", r"tensor 'model\.layers\.3\.mlp\.experts\.down_proj'")


def test_unknown_architecture_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, lambda c: c.update(model_type="llama"))
    _fails(src, tmp_path / "out", r"unknown architecture model_type='llama'")


def test_missing_config_key_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, lambda c: c.pop("num_experts_per_tok"))
    _fails(src, tmp_path / "out", r"missing key 'num_experts_per_tok'")


def test_unsupported_rope_scaling_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))
    _fails(src, tmp_path / "out", r"rope_parameters\.rope_type='yarn'")


@pytest.mark.parametrize("cut", [100, 5000])
def test_truncated_safetensors_names_file_and_tensor(world1, tmp_path, hf_dir, cut):
    src = _copy(hf_dir, tmp_path / "src")
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-cut])
    _fails(src, tmp_path / "out", r"model\.safetensors: truncated safetensors file: tensor '[^']+'")


def test_truncated_header(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    _fails(src, tmp_path / "out", r"model\.safetensors: truncated safetensors file")


def test_tensor_the_mapping_does_not_use_is_named(world1, tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_tensors(
        src, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    )
    _fails(
        src, tmp_path / "out", r"HF tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' is not used"
    )


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (ConvertLayout(tp=3), r"num_attention_heads=4 is not divisible by tp=3"),
        (ConvertLayout(ep=3), r"num_experts=8 is not divisible by ep=3"),
        (ConvertLayout(pp=3), r"num_layers=4 is not divisible by pp\*vp=3"),
        (ConvertLayout(tp=2, etp=1, ep=2), r"world size 1 is not a multiple"),
    ],
)
def test_layout_that_does_not_divide_the_model_is_refused(world1, tmp_path, hf_dir, layout, match):
    _fails(hf_dir, tmp_path / "out", match, layout=layout)


def test_existing_output_needs_overwrite(world1, tmp_path, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConversionError, match="output exists"):
        hf_to_mcore(hf_dir, out, show_progress=False)
    assert (out / "keep").exists()
    hf_to_mcore(hf_dir, out, overwrite=True, show_progress=False)
    assert not (out / "keep").exists() and (out / "pr2_model.json").exists()


def test_failure_while_writing_hf_leaves_nothing(world1, tmp_path, hf_dir, monkeypatch):
    from megatron_pr2.convert import safetensors_io

    hf_to_mcore(hf_dir, tmp_path / "mcore", show_progress=False)
    calls = {"n": 0}
    real_add = safetensors_io.ShardedSafetensorsWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError("disk full")
        return real_add(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "add", failing_add)
    out = tmp_path / "back"
    with pytest.raises(OSError, match="disk full"):
        # tiny shards: several files are already written when it fails
        mcore_to_hf(tmp_path / "mcore", out, max_shard_bytes=4096, show_progress=False)
    assert calls["n"] == 30
    _assert_nothing_left(out)


def test_checkpoint_missing_or_mismatched_tensor_names_the_key(world1, tmp_path):
    save(build_hf_model("mixtral"), tmp_path / "hf")
    mcore = tmp_path / "mcore"
    hf_to_mcore(tmp_path / "hf", mcore, show_progress=False)
    original = (mcore / "pr2_model.json").read_text()

    description = json.loads(original)  # asks for q/k norms the checkpoint lacks
    description["transformer_config"]["qk_layernorm"] = True
    description["qk_norm"] = "head"
    (mcore / "pr2_model.json").write_text(json.dumps(description))
    with pytest.raises(ConversionError, match=r"q_layernorm\.weight"):
        mcore_to_hf(mcore, tmp_path / "back", show_progress=False)
    _assert_nothing_left(tmp_path / "back")

    description = json.loads(original)  # asks for a fifth layer
    description["transformer_config"]["num_layers"] = 5
    (mcore / "pr2_model.json").write_text(json.dumps(description))
    with pytest.raises(ConversionError, match=r"shape mismatch .* key decoder\.layers\."):
        mcore_to_hf(mcore, tmp_path / "back", show_progress=False)
    _assert_nothing_left(tmp_path / "back")


def test_bad_description_names_the_key(tmp_path):
    (tmp_path / "pr2_model.json").write_text(
        json.dumps({"format": "megatron-pr2/converted-model", "version": 99})
    )
    with pytest.raises(ConversionError, match=r"key 'version' is 99"):
        load_converted_model_description(tmp_path)
    with pytest.raises(ConversionError, match=r"no pr2_model\.json"):
        load_converted_model_description(tmp_path / "elsewhere")
