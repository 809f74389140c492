"""gloo process groups and a ``run_dist`` launcher for multi-process tests (test-only).

``run_dist(fn, world_size, *args)`` spawns ``world_size`` processes, each of which installs the
CPU shim, joins a gloo group and calls ``fn(rank, world_size, *args)``. The parent fails (with
the child's traceback) if any rank raises. Layout matrices run inside one spawn: call
:func:`init_layout` again for every layout to reuse the processes.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Layout:
    """Model-parallel sizes; data parallel is whatever world size is left."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vp: int | None = None

    @property
    def name(self) -> str:
        parts = [
            f"{k.upper()}{v}"
            for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep))
            if v > 1
        ]
        if self.etp is not None:
            parts.append(f"ETP{self.etp}")
        if self.vp:
            parts.append(f"VP{self.vp}")
        return "x".join(parts) or "world1"


def init_process(rank: int, world_size: int, port: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from tests.support import cpu_shim

    cpu_shim.install()
    # OMP_NUM_THREADS, when set, wins: a second intra-op thread per process spin-waits for a
    # core that other processes hold, which made runs sharing the 2 cores up to 30x slower.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() else max(1, 2 // world_size))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def init_layout(layout: Layout, seed: int = 1234) -> None:
    """(Re)initialise megatron's model-parallel state for ``layout`` (the package's own
    helper; ``Layout`` has the fields it reads)."""
    from megatron_pr2.convert.runtime import init_parallel_state

    init_parallel_state(layout, seed)  # type: ignore[arg-type]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors: Any) -> None:
    try:
        init_process(rank, world_size, port)
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_dist(fn: Callable, world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on gloo processes; raise if any rank fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _entry,
            args=(world_size, free_port(), fn, args, errors),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except Exception as exc:
        reports = []
        while not errors.empty():
            rank, tb = errors.get()
            reports.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("a rank failed:\n" + "\n".join(reports)) from exc


def init_single_process() -> None:
    """World-1 gloo group and megatron state in this (pytest) process; idempotent."""
    if not dist.is_initialized():
        init_process(0, 1, free_port())
    init_layout(Layout())
