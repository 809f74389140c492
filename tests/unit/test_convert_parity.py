"""World-1 conversion oracles: logit parity with transformers and exact HF round trips.

Each case builds a tiny random model with transformers' own class, converts it to a megatron
dist checkpoint, loads that into megatron-core (the project's replay router, predictor at
zero) and compares fp32 logits; then converts back and compares every tensor bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_pr2.convert import (
    PREDICTOR_FILE,
    build_model_chunks_from_description,
    hf_to_mcore,
    load_chunks,
    load_converted_model_description,
    mcore_to_hf,
)
from megatron_pr2.convert.safetensors_io import iter_tensors
from tests.support.hf_models import (
    ARCHS,
    build_hf_model,
    hf_logits,
    legacy_config_spelling,
    mcore_logits,
    save,
)

TOL = 1e-4


def _tokens(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def _tensors(folder) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(folder))


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logit_parity_and_round_trip(world1, tmp_path, arch, fused):
    model = build_hf_model(arch)
    save(model, tmp_path / "hf", fused=fused)
    description, stats = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    assert stats.tensors > 0 and description.architecture == arch

    chunks = load_chunks(tmp_path / "mcore", load_converted_model_description(tmp_path / "mcore"))
    tokens = _tokens()
    diff = (hf_logits(model, tokens) - mcore_logits(chunks, tokens)).abs().max().item()
    assert diff <= TOL, f"{arch}: max |logit diff| {diff}"

    layout = "fused" if fused else "per_expert"
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", expert_layout=layout, show_progress=False)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_the_converted_back_model(world1, tmp_path, arch):
    import transformers

    model = build_hf_model(arch, seed=3)
    save(model, tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", show_progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    tokens = _tokens()
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_4x_config_spelling_converts_the_same(world1, tmp_path, arch):
    model = build_hf_model(arch, seed=1)
    save(model, tmp_path / "new")
    save(model, tmp_path / "old")
    legacy = legacy_config_spelling(tmp_path / "old")
    assert "rope_parameters" not in legacy and "rope_theta" in legacy
    assert ("num_experts" in legacy) == (arch != "mixtral")
    new_desc, _ = hf_to_mcore(tmp_path / "new", tmp_path / "m_new", show_progress=False)
    old_desc, _ = hf_to_mcore(tmp_path / "old", tmp_path / "m_old", show_progress=False)
    assert old_desc.transformer_config == new_desc.transformer_config
    assert old_desc.rotary_base == new_desc.rotary_base != 10000.0 or arch == "olmoe"
    tokens = _tokens()
    logits = [
        mcore_logits(
            load_chunks(tmp_path / d, load_converted_model_description(tmp_path / d)), tokens
        )
        for d in ("m_new", "m_old")
    ]
    assert torch.equal(logits[0], logits[1])
    assert (logits[1] - hf_logits(model, tokens)).abs().max().item() <= TOL


def test_predictor_is_zero_and_optionally_saved_on_the_way_back(world1, tmp_path):
    from safetensors.torch import load_file

    from megatron_pr2.config import RouterReplayConfig

    save(build_hf_model("qwen3_moe"), tmp_path / "hf")
    description, _ = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    assert description.has_predictor
    chunks = load_chunks(tmp_path / "mcore", description)
    predictors = {n: p for n, p in chunks[0].named_parameters() if "evolution_predictor" in n}
    assert len(predictors) == 4 and all(torch.count_nonzero(p) == 0 for p in predictors.values())

    # a "trained" predictor survives into the side file, and never into the HF weights
    with torch.no_grad():
        for p in predictors.values():
            p.fill_(0.5)
    from megatron.core import dist_checkpointing

    trained = tmp_path / "trained"
    trained.mkdir()
    dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, str(trained))
    (trained / "pr2_model.json").write_text((tmp_path / "mcore" / "pr2_model.json").read_text())
    mcore_to_hf(trained, tmp_path / "back", save_predictor=True, show_progress=False)
    side = load_file(str(tmp_path / "back" / PREDICTOR_FILE))
    assert sorted(side) == [
        f"decoder.layers.{i}.mlp.router.evolution_predictor.weight" for i in range(4)
    ]
    assert all(torch.all(t == 0.5) for t in side.values())
    assert not any("predictor" in name for name in _tensors(tmp_path / "back"))
    mcore_to_hf(trained, tmp_path / "back2", show_progress=False)
    assert not (tmp_path / "back2" / PREDICTOR_FILE).exists()

    # hf-to-mcore picks the side file up again: the trained predictor round-trips
    hf_to_mcore(tmp_path / "back", tmp_path / "again", show_progress=False)
    again = load_chunks(tmp_path / "again", description)[0]
    restored = [p for n, p in again.named_parameters() if "evolution_predictor" in n]
    assert len(restored) == 4 and all(torch.all(p == 0.5) for p in restored)

    # the trainer's entry point rebuilds the same model from the description
    rebuilt = build_model_chunks_from_description(description, RouterReplayConfig(mode="r2"))
    names = {n for n, _ in rebuilt[0].named_parameters()}
    assert "decoder.layers.0.mlp.router.weight" in names
    assert not any("evolution_predictor" in n for n in names)


def test_description_records_what_the_trainer_needs(world1, tmp_path):
    save(build_hf_model("mixtral"), tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    payload = json.loads((tmp_path / "mcore" / "pr2_model.json").read_text())
    assert payload["format"] == "megatron-pr2/converted-model"
    assert payload["architecture"] == "mixtral"
    assert payload["vocab_size"] == 96 and payload["max_sequence_length"] == 64
    assert payload["transformer_config"]["num_moe_experts"] == 8
    assert payload["transformer_config"]["moe_router_pre_softmax"] is False
    assert payload["rotary_base"] == 1_000_000.0
    assert payload["hf_config"]["model_type"] == "mixtral"


def test_converted_checkpoint_trains_and_converts_back(world1, tmp_path):
    """The trainer's path: rebuild from the description, load with the project's
    ``load_checkpoint``, take optimizer steps, save, and convert the trained checkpoint back."""
    import transformers

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import LMBatch
    from megatron_pr2.models.training import (
        load_checkpoint,
        save_checkpoint,
        setup_training,
        train_step,
    )

    model = build_hf_model("qwen3_moe", seed=5)
    save(model, tmp_path / "hf")
    description, _ = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    chunks = build_model_chunks_from_description(description, RouterReplayConfig(mode="pr2"))
    setup = setup_training(chunks, lr=1e-3)
    load_checkpoint(setup, tmp_path / "mcore", load_optimizer=False)
    tokens = _tokens()
    assert (mcore_logits(chunks, tokens) - hf_logits(model, tokens)).abs().max().item() <= TOL

    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        chunks[0].train()
        batches = [LMBatch.random(2, 12, 96, gen) for _ in range(2)]
        step_losses, _ = train_step(setup, batches)
        losses.append(float(step_losses[0]["lm_loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    save_checkpoint(setup, tmp_path / "trained")

    mcore_to_hf(
        tmp_path / "trained",
        tmp_path / "back",
        description_path=tmp_path / "mcore",
        show_progress=False,
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    trained_logits = mcore_logits(chunks, tokens)
    assert (hf_logits(reloaded, tokens) - trained_logits).abs().max().item() <= TOL
    assert (hf_logits(reloaded, tokens) - hf_logits(model, tokens)).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "variant",
    [{"tie_word_embeddings": True}, {"mlp_only_layers": [0, 2]}],
    ids=["tied_embeddings", "dense_layers"],
)
def test_qwen3_variants_parity_and_round_trip(world1, tmp_path, variant):
    model = build_hf_model("qwen3_moe", seed=4, **variant)
    save(model, tmp_path / "hf")
    description, _ = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    if "mlp_only_layers" in variant:
        assert description.transformer_config["moe_layer_freq"] == [0, 1, 0, 1]
    else:
        assert description.share_embeddings_and_output_weights
    chunks = load_chunks(tmp_path / "mcore", description)
    tokens = _tokens()
    assert (hf_logits(model, tokens) - mcore_logits(chunks, tokens)).abs().max().item() <= TOL
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", show_progress=False)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_bfloat16_conversion_round_trips_the_cast_weights(world1, tmp_path):
    import transformers

    model = build_hf_model("mixtral", seed=6)
    save(model, tmp_path / "hf")
    description, _ = hf_to_mcore(
        tmp_path / "hf", tmp_path / "mcore", dtype="bfloat16", show_progress=False
    )
    assert description.dtype == "bfloat16"
    (chunk,) = load_chunks(tmp_path / "mcore", description)
    dtypes = {p.dtype for n, p in chunk.named_parameters() if "linear" in n or "embed" in n}
    assert dtypes == {torch.bfloat16}  # (megatron's torch norms stay fp32)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", show_progress=False)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(torch.equal(back[k], original[k].to(torch.bfloat16)) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
