"""Where and how a run is launched: the recipe's ``cluster:`` section plus command-line flags.

Plain data, no nemo-run import, so recipes can be checked on a machine without the ``launch``
extra. :mod:`megatron_pr2.launch.nemo` turns a :class:`LaunchSpec` into nemo-run objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "CPUS_PER_GPU_RANK",
    "RDZV_PORT_BASE",
    "RDZV_PORT_SPAN",
    "REPO_ROOT",
    "LaunchSpec",
    "cluster_from_section",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")
_MEM = re.compile(r"^\d+[KMGT]?$")
#: Host cores per GPU rank when ``cluster.cpus_per_task`` is not given (data loading, NCCL
#: proxy threads, the rollout engine's host side); 8 ranks x 8 fit every common 8-GPU node.
CPUS_PER_GPU_RANK = 8
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000


@dataclass
class LaunchSpec:
    """The ``cluster:`` keys. ``gpus_per_node: 0`` means a CPU job (gloo, ``examples/train.py``).

    Attributes:
        executor: ``slurm`` (sbatch through nemo-run's SlurmExecutor) or ``local`` (torchrun on
            this machine through nemo-run's LocalExecutor).
        nproc_per_node: torchrun processes per node; defaults to ``gpus_per_node`` (1 on CPU).
        entry: ``pr2`` (``pr2 train``, CUDA), ``examples`` (``python examples/train.py``, the
            CPU path with the test-only shim) or ``auto`` (``pr2`` when GPUs are requested).
        job_dir: nemo-run's home (its ``experiments/`` folder holds the sbatch scripts, logs
            and the resolved trainer configs); must be on a file system the nodes share, and
            no folder on its path may be named ``nemo_run``.
        gpu_memory_gb: device memory per GPU, for ``check-recipe``'s capacity check.
        exclusive: ``#SBATCH --exclusive`` (default): the job owns its nodes, so no other job
            competes for the GPUs' host cores, memory bandwidth or NICs.
        cpus_per_task: ``#SBATCH --cpus-per-task``. There is one task per node (torchrun starts
            the ranks), and clusters that confine a job step to its allocated cores would pin
            all ranks of a node to one core without it. ``None`` (default): ``procs_per_node x
            CPUS_PER_GPU_RANK`` on GPU jobs, ``procs_per_node`` on CPU jobs; ``0``: no line.
        mem: ``#SBATCH --mem``; ``"0"`` (default) is all of each node's memory, ``None`` no line.
        rdzv_port: torchrun's c10d rendezvous port on the first node. ``None`` (default) derives
            it from the job id (``RDZV_PORT_BASE + SLURM_JOB_ID % RDZV_PORT_SPAN``, below the
            Linux ephemeral range), so two jobs sharing a node do not collide on one port.
        sbatch: extra ``#SBATCH`` parameters (``{qos: high}``); a key here replaces the
            defaults above (``{exclusive: user}``, ``{mem: 500G}``).
    """

    executor: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    nproc_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    job_dir: str | None = None
    job_name: str | None = None
    entry: str = "auto"
    gpu_memory_gb: float | None = None
    exclusive: bool = True
    cpus_per_task: int | None = None
    mem: str | None = "0"
    rdzv_port: int | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.executor not in ("slurm", "local"):
            raise ValueError(f"cluster.executor must be slurm or local, got {self.executor!r}")
        if self.entry not in ("auto", "pr2", "examples"):
            raise ValueError(f"cluster.entry must be auto, pr2 or examples, got {self.entry!r}")
        if int(self.nodes) < 1:
            raise ValueError(f"cluster.nodes must be >= 1, got {self.nodes}")
        if int(self.gpus_per_node) < 0:
            raise ValueError(f"cluster.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.nproc_per_node is not None and int(self.nproc_per_node) < 1:
            raise ValueError(f"cluster.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if not _TIME.match(str(self.time)):
            raise ValueError(f"cluster.time must be [D-]HH:MM:SS, got {self.time!r}")
        if self.executor == "local" and int(self.nodes) != 1:
            raise ValueError("cluster.executor=local runs on this machine: nodes must be 1")
        if self.job_dir and "nemo_run" in Path(str(self.job_dir)).expanduser().parts:
            # nemo-run rewrites "/nemo_run" in job paths (its in-container run dir), which
            # mangles the sbatch --output path of a job dir below a folder of that name.
            raise ValueError(
                f"cluster.job_dir={self.job_dir!r}: no folder of the path may be named "
                "'nemo_run' (nemo-run rewrites it); the default ~/.nemo_run is fine"
            )
        if self.cpus_per_task is not None and int(self.cpus_per_task) < 0:
            raise ValueError(f"cluster.cpus_per_task must be >= 0, got {self.cpus_per_task}")
        if self.mem is not None and not _MEM.match(str(self.mem)):
            raise ValueError(
                f"cluster.mem must be a SLURM size (0, 500G, 64000M), got {self.mem!r}"
            )
        if self.rdzv_port is not None and not 0 < int(self.rdzv_port) < 65536:
            raise ValueError(f"cluster.rdzv_port must be a TCP port, got {self.rdzv_port}")
        self.mem = None if self.mem is None else str(self.mem)
        self.env = {str(k): str(v) for k, v in (self.env or {}).items()}
        self.container_mounts = [str(m) for m in (self.container_mounts or [])]

    @property
    def procs_per_node(self) -> int:
        if self.nproc_per_node is not None:
            return int(self.nproc_per_node)
        return int(self.gpus_per_node) or 1

    @property
    def sbatch_cpus_per_task(self) -> int | None:
        """The ``--cpus-per-task`` value (None: no line); see ``cpus_per_task``."""
        if self.cpus_per_task is not None:
            return int(self.cpus_per_task) or None
        return self.procs_per_node * (CPUS_PER_GPU_RANK if self.uses_gpus else 1)

    @property
    def world_size(self) -> int:
        return int(self.nodes) * self.procs_per_node

    @property
    def uses_gpus(self) -> bool:
        return int(self.gpus_per_node) > 0

    @property
    def resolved_entry(self) -> str:
        if self.entry != "auto":
            return self.entry
        return "pr2" if self.uses_gpus else "examples"


def cluster_from_section(section: Mapping[str, Any], flags: Mapping[str, Any] = ()) -> LaunchSpec:
    """:class:`LaunchSpec` from a ``cluster:`` mapping, command-line ``flags`` (non-None) on top."""
    names = {f.name for f in fields(LaunchSpec)}
    values: dict[str, Any] = {}
    for key, value in dict(section or {}).items():
        if key not in names:
            raise ValueError(f"unknown config key 'cluster.{key}'")
        values[key] = value
    for key, value in dict(flags or {}).items():
        if value is None:
            continue
        if key == "env":
            values["env"] = {**(values.get("env") or {}), **value}
        elif key == "container_mounts":
            values["container_mounts"] = [*(values.get("container_mounts") or []), *value]
        else:
            values[key] = value
    return LaunchSpec(**values)
