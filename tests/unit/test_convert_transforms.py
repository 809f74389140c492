"""Layout transforms, the architecture table, config spellings and the CLI (no model build)."""

from __future__ import annotations

import pytest
import torch

from megatron_pr2.convert.architectures import ARCHITECTURES, architecture_for
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_config import read_shape
from megatron_pr2.convert.layout import ConvertLayout
from megatron_pr2.convert.transforms import fuse_qkv, gate_up_shard, split_gate_up, split_qkv


def test_fused_qkv_is_megatrons_per_group_interleave():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 1: rows name their source head.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, num_query_groups=2, head_dim=1)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    # TP2 gives each rank whole groups
    assert torch.chunk(fused, 2)[1].flatten().tolist() == [12, 13, 21, 31]


@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(4, 2, 3), (8, 8, 2), (6, 1, 4)])
def test_split_qkv_inverts_fuse(heads, groups, head_dim):
    hidden = 5
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(groups * head_dim, hidden)
    v = torch.randn(groups * head_dim, hidden)
    back = split_qkv(fuse_qkv(q, k, v, groups, head_dim), groups, head_dim)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_gate_up_shards_keep_gate_then_up_per_rank():
    gate = torch.arange(4.0).unsqueeze(1)
    up = 10 + torch.arange(4.0).unsqueeze(1)
    assert gate_up_shard(gate, up, 1, 2).flatten().tolist() == [2, 3, 12, 13]
    full_gate, full_up = split_gate_up(gate_up_shard(gate, up, 0, 1))
    assert torch.equal(full_gate, gate) and torch.equal(full_up, up)


BASE = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    intermediate_size=8,
)


@pytest.mark.parametrize(
    "spelling",
    [
        {"num_experts": 8, "rope_theta": 5e5},
        {"num_local_experts": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    ],
    ids=["transformers4", "transformers5"],
)
@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "mixtral"])
def test_both_config_spellings_read_the_same(model_type, spelling):
    shape = read_shape({**BASE, "model_type": model_type, **spelling})
    assert shape.num_experts == 8 and shape.rope_theta == 5e5


def test_table_rows_and_unknown_architecture():
    assert {a.name for a in ARCHITECTURES} == {"qwen3_moe", "olmoe", "mixtral"}
    assert architecture_for({"model_type": "olmoe"}).qk_norm == "full"
    with pytest.raises(ConversionError, match=r"model_type='deepseek_v3'"):
        architecture_for({"model_type": "deepseek_v3"})


def test_router_normalisation_follows_the_config():
    qwen = architecture_for({"model_type": "qwen3_moe"})
    mixtral = architecture_for({"model_type": "mixtral"})
    plain = read_shape({**BASE, "model_type": "qwen3_moe", "num_experts": 8})
    normed = read_shape(
        {**BASE, "model_type": "qwen3_moe", "num_experts": 8, "norm_topk_prob": True}
    )
    assert qwen.megatron_kwargs(plain)["moe_router_pre_softmax"] is True
    assert qwen.megatron_kwargs(normed)["moe_router_pre_softmax"] is False
    assert mixtral.megatron_kwargs(plain)["moe_router_pre_softmax"] is False


def test_dense_layers_become_a_moe_layer_pattern():
    config = {**BASE, "model_type": "qwen3_moe", "num_experts": 8, "mlp_only_layers": [0]}
    kwargs = architecture_for(config).megatron_kwargs(read_shape(config))
    assert kwargs["moe_layer_freq"] == [0, 1]


def test_layout_lists_every_problem():
    shape = read_shape({**BASE, "model_type": "mixtral", "num_local_experts": 8})
    kwargs = architecture_for({"model_type": "mixtral"}).megatron_kwargs(shape)
    with pytest.raises(ConversionError) as info:
        ConvertLayout(tp=3, ep=3).check(kwargs, 64, world_size=9)
    message = str(info.value)
    for part in (
        "num_attention_heads=4",
        "num_key_value_heads=2",
        "vocab_size=64",
        "num_experts=8",
    ):
        assert part in message
    ConvertLayout(tp=2, ep=2).check(kwargs, 64, world_size=4)
    assert ConvertLayout(tp=2, ep=2).model_parallel_size == 4  # ETP defaults to TP
    assert ConvertLayout(tp=2, ep=2, etp=1).model_parallel_size == 2
    assert ConvertLayout(tp=2, ep=4, etp=1, pp=2).model_parallel_size == 8


def test_cli_parses_both_directions():
    import argparse

    from megatron_pr2.commands import COMMAND_MODULES, convert

    assert "megatron_pr2.commands.convert" in COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="pr2")
    convert.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "hf-to-mcore", "a", "b", "--tp", "2", "--ep", "4"])
    assert (args.direction, args.tp, args.ep, args.etp) == ("hf-to-mcore", 2, 4, None)
    assert args.handler is convert.run
    args = parser.parse_args(["convert", "mcore-to-hf", "a", "b", "--max-shard-size", "1GB"])
    assert args.max_shard_size == 1024**3 and args.expert_layout == "per_expert"


def test_reader_unmaps_while_streaming_and_reads_slices(tmp_path):
    from safetensors.torch import save_file

    from megatron_pr2.convert.safetensors_io import SafetensorsReader

    tensors = {f"t{i}": torch.randn(64, 32) for i in range(6)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    reader.UNMAP_EVERY_BYTES = 3 * 64 * 32 * 4  # drop the map after every third tensor
    for i in range(6):
        assert torch.equal(reader.get(f"t{i}", (64, 32)), tensors[f"t{i}"])
        assert len(reader._handles) == (0 if i % 3 == 2 else 1)
    part = reader.get("t4", (64, 32), index=(slice(None), slice(8, 16)))
    assert torch.equal(part, tensors["t4"][:, 8:16])
    with pytest.raises(ConversionError, match=r"tensor 't1': shape \[64, 32\] does not match"):
        reader.get("t1", (32, 64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU hint is for machines without CUDA")
def test_pr2_convert_without_cuda_points_to_the_cpu_tool(capsys):
    import argparse

    from megatron_pr2.commands import convert

    parser = argparse.ArgumentParser(prog="pr2")
    convert.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "mcore-to-hf", "a", "b"])
    assert args.handler(args) == 2
    assert "tools/convert_checkpoint.py" in capsys.readouterr().err
