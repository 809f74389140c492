"""Settings a ``config.json`` leaves out convert as transformers reads them for that
architecture; architectures the converter cannot map are refused with the reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_pr2.convert import (
    ConversionError,
    architecture_for,
    hf_to_mcore,
    load_chunks,
    load_converted_model_description,
)
from megatron_pr2.convert.hf_config import read_shape
from tests.support.hf_models import build_hf_model, hf_logits, mcore_logits, save

TOL = 1e-4


def _drop(folder: Path, keys: tuple[str, ...]) -> dict:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in keys:
        config.pop(key, None)
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize(
    ("arch", "keys"),
    [
        ("mixtral", ("rms_norm_eps",)),
        ("mixtral", ("rope_parameters", "rope_theta")),
        ("olmoe", ("rms_norm_eps",)),
    ],
    ids=["mixtral-eps", "mixtral-rope", "olmoe-eps"],
)
def test_missing_setting_converts_as_transformers_reads_the_folder(world1, tmp_path, arch, keys):
    import transformers

    # the oracle is the folder as transformers loads it: the class defaults (Mixtral eps 1e-5,
    # theta 1e6; OLMoE eps 1e-5) differ from any one project-wide default (1e-6, 1e4)
    config = _drop(save(build_hf_model(arch, seed=2), tmp_path / "hf"), keys)
    assert not any(k in config for k in keys)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))

    description, _ = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    chunks = load_chunks(tmp_path / "mcore", load_converted_model_description(tmp_path / "mcore"))
    diff = (hf_logits(reloaded, tokens) - mcore_logits(chunks, tokens)).abs().max().item()
    assert diff <= TOL, f"{arch} without {keys}: max |logit diff| {diff}"
    assert description.transformer_config["layernorm_epsilon"] == reloaded.config.rms_norm_eps


BASE = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_experts_per_tok=2,
    intermediate_size=8,
    num_local_experts=8,
)


def test_defaults_are_the_architectures_own():
    """Each class's defaults, also derived ones (Mixtral: 8 KV heads whatever the heads)."""
    import transformers

    for model_type in ("qwen3_moe", "olmoe", "mixtral"):
        shape = read_shape({**BASE, "model_type": model_type})
        expected = transformers.AutoConfig.for_model(model_type, **BASE)
        assert shape.rms_norm_eps == expected.rms_norm_eps, model_type
        assert shape.rope_theta == expected.rope_parameters["rope_theta"], model_type
        assert shape.num_key_value_heads == expected.num_key_value_heads, model_type
        assert shape.max_position_embeddings == expected.max_position_embeddings, model_type
        assert shape.tie_word_embeddings == expected.tie_word_embeddings, model_type


def test_a_default_never_overrides_the_files_other_spelling():
    shape = read_shape({**BASE, "model_type": "olmoe", "num_local_experts": 4, "rope_theta": 5.0})
    assert shape.num_experts == 4 and shape.rope_theta == 5.0


def test_without_transformers_a_missing_setting_is_refused(monkeypatch):
    complete = {
        **BASE,
        "model_type": "mixtral",
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "max_position_embeddings": 64,
    }
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert read_shape(complete).rms_norm_eps == 1e-5  # a complete file needs no defaults
    for key in ("rms_norm_eps", "rope_theta", "num_key_value_heads", "tie_word_embeddings"):
        config = {k: v for k, v in complete.items() if k != key}
        with pytest.raises(ConversionError, match=rf"missing key '{key}'.*mixtral.*transformers"):
            read_shape(config)


def test_shape_settings_are_required_not_defaulted():
    for key in ("hidden_size", "num_experts_per_tok", "num_local_experts"):
        config = {k: v for k, v in {**BASE, "model_type": "mixtral"}.items() if k != key}
        with pytest.raises(ConversionError, match=rf"missing key .*'{key}'"):
            read_shape(config)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_mla_architectures_say_why_they_are_refused(world1, tmp_path, model_type):
    import transformers

    with pytest.raises(ConversionError, match=rf"model_type='{model_type}' uses multi-head latent"):
        architecture_for({"model_type": model_type})

    config = transformers.AutoConfig.for_model(model_type).to_dict()
    assert config["kv_lora_rank"]  # what makes it MLA
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as info:
        hf_to_mcore(tmp_path / "hf", tmp_path / "out", show_progress=False)
    message = str(info.value)
    assert "attention (MLA)" in message and "not supported" in message
    assert "kv_b_proj" in message and "GPT layer spec" in message
    assert "unknown architecture" not in message
    assert not (tmp_path / "out").exists()


def test_any_config_with_kv_lora_rank_is_mla():
    with pytest.raises(ConversionError, match=r"multi-head latent attention"):
        architecture_for({"model_type": "kimi_k2", "kv_lora_rank": 512})
    with pytest.raises(ConversionError, match=r"unknown architecture model_type='llama'"):
        architecture_for({"model_type": "llama"})
