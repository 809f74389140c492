"""``pr2 convert``: Hugging Face MoE folders <-> megatron-core ``torch_dist`` checkpoints.

``pr2 convert hf-to-mcore HF_DIR OUT --tp 2 --ep 2`` writes the checkpoint at that layout:
under torchrun it uses the launched ranks; otherwise it starts the processes itself.
``pr2 convert mcore-to-hf CKPT OUT`` reads any saved layout on one process. On a machine
without CUDA, run the same arguments through ``tools/convert_checkpoint.py``, which supplies
the test-only CPU shim (the package never imports it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

#: Exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a process it interrupted.
INTERRUPTED_EXIT_CODE = 130

CPU_HINT = (
    "pr2 convert needs CUDA for megatron-core. On a CPU-only machine run the same arguments "
    "with the test-only CPU shim: python tools/convert_checkpoint.py ARGS"
)


class Launcher(Protocol):
    """How conversion processes get a process group (CUDA/NCCL here; CPU/gloo in tools/)."""

    def init_world1(self) -> None: ...

    def init_from_env(self) -> None: ...

    def spawn(self, fn: Callable[..., None], world_size: int, *args: Any) -> None: ...


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` arguments (shared by ``pr2 convert`` and tools/convert_checkpoint.py)."""
    directions = parser.add_subparsers(dest="direction", required=True)
    to_mcore = directions.add_parser("hf-to-mcore", help="HF folder -> megatron dist checkpoint")
    to_mcore.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    to_mcore.add_argument("out_dir", help="checkpoint directory to create")
    for name in ("tp", "pp", "ep"):
        to_mcore.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size")
    to_mcore.add_argument("--etp", type=int, default=None, help="expert TP size (default: tp)")
    to_mcore.add_argument("--vp", type=int, default=None, help="virtual pipeline stages")
    to_mcore.add_argument("--dtype", default="auto", help="float32|bfloat16|float16|auto")
    to_mcore.add_argument("--no-predictor", action="store_true", help="no PR2 predictor weights")
    to_mcore.add_argument("--pad-vocab-multiple", type=int, default=1)
    to_mcore.add_argument("--max-seq-len", type=int, default=None)
    to_hf = directions.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF folder")
    to_hf.add_argument("ckpt_dir", help="converted (or trained) checkpoint directory")
    to_hf.add_argument("out_dir", help="HF folder to create")
    to_hf.add_argument("--expert-layout", choices=("per_expert", "fused"), default="per_expert")
    to_hf.add_argument(
        "--save-predictor", action="store_true", help="write pr2_predictor.safetensors too"
    )
    to_hf.add_argument("--max-shard-size", type=_size, default=2 * 1024**3)
    to_hf.add_argument(
        "--description", default=None, help="pr2_model.json if not inside CKPT_DIR (trained ckpt)"
    )
    for sub in (to_mcore, to_hf):
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pr2 convert`` (hf-to-mcore / mcore-to-hf) to the ``pr2`` parser."""
    parser = subparsers.add_parser("convert", help="HF <-> megatron checkpoint conversion")
    add_arguments(parser)
    parser.set_defaults(handler=run)


class CudaLauncher:
    """NCCL process groups: world 1 in-process, torchrun's env, or spawned local ranks."""

    def init_world1(self) -> None:
        import torch

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29513")
        torch.cuda.set_device(0)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", rank=0, world_size=1)

    def init_from_env(self) -> None:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl")

    def spawn(self, fn: Callable[..., None], world_size: int, *args: Any) -> None:
        import torch.multiprocessing as mp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29514")
        mp.spawn(_cuda_rank, args=(world_size, fn, args), nprocs=world_size, join=True)


def _cuda_rank(rank: int, world_size: int, fn: Callable[..., None], args: tuple) -> None:
    import torch

    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def _hf_to_mcore_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from megatron_pr2.convert import ConvertLayout

    return dict(
        hf_dir=args.hf_dir,
        out_dir=args.out_dir,
        layout=ConvertLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vp=args.vp),
        dtype=args.dtype,
        with_predictor=not args.no_predictor,
        pad_vocab_multiple=args.pad_vocab_multiple,
        max_sequence_length=args.max_seq_len,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )


def hf_to_mcore_rank(rank: int, world_size: int, kwargs: dict[str, Any]) -> None:
    """One rank of a spawned hf-to-mcore conversion (module level so it pickles)."""
    from megatron_pr2.convert import hf_to_mcore

    _, stats = hf_to_mcore(**kwargs)
    if rank == 0:
        _report(kwargs["out_dir"], stats)


def _report(out_dir: str, stats: Any) -> None:
    rate = stats.bytes_read / max(stats.seconds, 1e-9) / 1e9
    print(
        f"wrote {out_dir}: {stats.tensors} tensors, {stats.bytes_read / 1e6:.1f} MB "
        f"in {stats.seconds:.1f} s ({rate:.3f} GB/s)"
    )


def _precheck(kwargs: dict[str, Any]) -> int:
    """Validate config, files and layout in this process before starting any rank."""
    from pathlib import Path

    from megatron_pr2.convert.errors import ConversionError
    from megatron_pr2.convert.hf_config import read_config_json
    from megatron_pr2.convert.hf_to_mcore import describe
    from megatron_pr2.convert.safetensors_io import SafetensorsReader

    layout = kwargs["layout"]
    _, _, description = describe(
        read_config_json(kwargs["hf_dir"]), kwargs["dtype"], kwargs["pad_vocab_multiple"]
    )
    world = int(os.environ.get("WORLD_SIZE", layout.model_parallel_size))
    layout.check(description.transformer_config, description.vocab_size, world)
    SafetensorsReader(kwargs["hf_dir"])
    if Path(kwargs["out_dir"]).exists() and not kwargs["overwrite"]:
        raise ConversionError(f"{kwargs['out_dir']}: output exists (pass --overwrite)")
    return world


def run(args: argparse.Namespace, launcher: Launcher | None = None) -> int:
    """Handler: 0 on success, 1 with a one-line error for bad input, 2 without CUDA or a
    launcher (``tools/convert_checkpoint.py`` passes the CPU one), 130 after Ctrl-C (an
    interrupt is never a success, and leaves no output)."""
    from megatron_pr2.convert import ConversionError

    if launcher is None:
        import torch

        if not torch.cuda.is_available():
            print(CPU_HINT, file=sys.stderr)
            return 2
        launcher = CudaLauncher()
    try:
        if args.direction == "mcore-to-hf":
            from megatron_pr2.convert import mcore_to_hf

            launcher.init_world1()
            stats = mcore_to_hf(
                args.ckpt_dir,
                args.out_dir,
                expert_layout=args.expert_layout,
                save_predictor=args.save_predictor,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
                show_progress=not args.no_progress,
                description_path=args.description,
            )
            _report(args.out_dir, stats)
            return 0
        kwargs = _hf_to_mcore_kwargs(args)
        world = _precheck(kwargs)
        if "WORLD_SIZE" in os.environ:
            launcher.init_from_env()
            import torch.distributed as dist

            hf_to_mcore_rank(dist.get_rank(), world, kwargs)
        elif world == 1:
            launcher.init_world1()
            hf_to_mcore_rank(0, 1, kwargs)
        else:
            launcher.spawn(hf_to_mcore_rank, world, kwargs)
        return 0
    except ConversionError as exc:
        print(f"pr2 convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from megatron_pr2.convert.atomic import discard_partial

        discard_partial(args.out_dir)  # the conversion's own cleanup may have been cut short
        print(f"pr2 convert: interrupted; nothing written at {args.out_dir}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
