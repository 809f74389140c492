"""hf-to-mcore at multi-process layouts (TP/EP/ETP/PP/VPP, 4 gloo ranks, one spawn).

Oracles: (1) for layouts without PP, the logits of the model as it is sharded in the ranks
(gathered over TP) equal transformers' logits; (2) every checkpoint, loaded back at world 1 in
the parent, gives transformers' logits and converts back to the original HF tensors bit for
bit (mcore-to-hf from any layout).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from megatron_pr2.convert import (
    ConvertLayout,
    hf_to_mcore,
    load_chunks,
    load_converted_model_description,
    mcore_to_hf,
)
from megatron_pr2.convert.safetensors_io import iter_tensors
from tests.support.hf_models import build_hf_model, hf_logits, mcore_logits, save

TOL = 1e-4
CASES = [  # (arch, fused expert files, layout)
    ("qwen3_moe", True, ConvertLayout(tp=2, ep=2)),  # ETP2 slices of fused expert tensors
    ("olmoe", True, ConvertLayout(tp=2, ep=2, etp=1)),  # full-width q/k norm across TP
    ("mixtral", False, ConvertLayout(tp=2, pp=2)),  # ETP2 slices of per-expert tensors
    ("qwen3_moe", False, ConvertLayout(pp=2, vp=2, ep=2)),
]


def _name(arch: str, fused: bool, layout: ConvertLayout) -> str:
    parts = [f"{k}{v}" for k, v in layout.to_dict().items() if v not in (None, 1)]
    return f"{arch}_{'fused' if fused else 'per_expert'}_{'x'.join(parts)}"


def _layout_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits of a TP/EP-sharded (no PP) model on this rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    (model,) = chunks
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        local = model(tokens, positions, attention_mask=None).float()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _worker(rank: int, world_size: int, root: str) -> None:
    from megatron.core import parallel_state

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.convert import build_model_chunks_from_description

    root_path = Path(root)
    for arch, fused, layout in CASES:
        name = _name(arch, fused, layout)
        description, _ = hf_to_mcore(
            root_path / f"hf_{arch}_{fused}", root_path / name, layout=layout, show_progress=False
        )
        assert parallel_state.get_tensor_model_parallel_world_size() == layout.tp
        if layout.pp == 1:
            # the in-memory shards the conversion filled, run as they are
            from megatron.core import dist_checkpointing

            chunks = build_model_chunks_from_description(description, RouterReplayConfig("pr2"))
            state = {"model": chunks[0].sharded_state_dict()}
            chunks[0].load_state_dict(
                dist_checkpointing.load(state, str(root_path / name))["model"]
            )
            ref = torch.load(root_path / f"ref_{arch}_{fused}.pt")
            logits = _layout_logits(chunks, ref["tokens"])
            diff = (logits[..., : ref["logits"].shape[-1]] - ref["logits"]).abs().max().item()
            assert diff <= TOL, f"rank {rank} {name}: max |logit diff| {diff}"


@pytest.mark.slow
def test_convert_at_multi_process_layouts(run_dist, world1, tmp_path):
    models = {}
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    for arch, fused, _ in CASES:
        if (arch, fused) in models:
            continue
        model = build_hf_model(arch, seed=11)
        save(model, tmp_path / f"hf_{arch}_{fused}", fused=fused)
        torch.save(
            {"tokens": tokens, "logits": hf_logits(model, tokens)},
            tmp_path / f"ref_{arch}_{fused}.pt",
        )
        models[(arch, fused)] = model

    run_dist(_worker, 4, str(tmp_path))

    for arch, fused, layout in CASES:
        name = _name(arch, fused, layout)
        ckpt = tmp_path / name
        assert load_converted_model_description(ckpt).saved_layout["ep"] == layout.ep
        chunks = load_chunks(ckpt, load_converted_model_description(ckpt))
        diff = (mcore_logits(chunks, tokens) - hf_logits(models[(arch, fused)], tokens)).abs().max()
        assert diff.item() <= TOL, f"{name} loaded at world 1: max |logit diff| {diff.item()}"
        back = tmp_path / f"back_{name}"
        mcore_to_hf(
            ckpt, back, expert_layout="fused" if fused else "per_expert", show_progress=False
        )
        original, converted = (
            dict(iter_tensors(tmp_path / f"hf_{arch}_{fused}")),
            dict(iter_tensors(back)),
        )
        assert sorted(converted) == sorted(original), name
        for key, tensor in original.items():
            assert torch.equal(converted[key], tensor), f"{name}: {key}"


@pytest.mark.slow
def test_cli_starts_the_layout_itself_or_runs_under_torchrun(world1, tmp_path):
    """``tools/convert_checkpoint.py`` (the CPU face of ``pr2 convert``) at EP2: once spawning
    its own ranks, once as torchrun's ranks; both checkpoints match transformers."""
    import os
    import subprocess
    import sys

    from tests.support.dist import free_port

    root = Path(__file__).resolve().parents[2]
    tool = str(root / "tools" / "convert_checkpoint.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    model = build_hf_model("mixtral", seed=12)
    save(model, tmp_path / "hf")
    args = ["hf-to-mcore", str(tmp_path / "hf"), "--ep", "2", "--no-progress"]
    commands = {
        "spawned": [sys.executable, tool, *args[:2], str(tmp_path / "spawned"), *args[2:]],
        "torchrun": [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), tool, *args[:2], str(tmp_path / "torchrun"), *args[2:],
        ],
    }  # fmt: skip
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    for name, command in commands.items():
        done = subprocess.run(
            command, env=env, cwd=root, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "wrote" in done.stdout
        ckpt = tmp_path / name
        assert load_converted_model_description(ckpt).saved_layout["ep"] == 2
        chunks = load_chunks(ckpt, load_converted_model_description(ckpt))
        diff = (mcore_logits(chunks, tokens) - hf_logits(model, tokens)).abs().max().item()
        assert diff <= TOL, f"{name}: max |logit diff| {diff}"


def _missing_tensor_worker(rank: int, world_size: int, root: str) -> None:
    from megatron_pr2.convert import ConversionError

    try:
        hf_to_mcore(
            Path(root) / "hf", Path(root) / "out", layout=ConvertLayout(ep=2), show_progress=False
        )
    except ConversionError as exc:
        # only EP rank 1 holds expert 7, yet every rank fails with its name (no hang)
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: conversion of a folder missing a tensor succeeded")


@pytest.mark.slow
def test_a_tensor_missing_on_one_rank_fails_every_rank_and_leaves_nothing(run_dist, tmp_path):
    from safetensors.torch import load_file, save_file

    save(build_hf_model("qwen3_moe", seed=13), tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.experts.7.down_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    run_dist(_missing_tensor_worker, 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
