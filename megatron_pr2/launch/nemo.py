"""The trainer as a nemo-run job: ``run.Script`` under the torchrun launcher, on a
``LocalExecutor`` (processes on this machine) or a ``SlurmExecutor`` (sbatch + srun).

nemo-run is imported inside the functions (the ``launch`` extra: ``nemo-run==0.11.1`` with
``leptonai==0.27.3``, since newer leptonai releases break ``import nemo_run``).

Traps this module handles (found by running nemo-run 0.11.1 against a real SLURM):

* ``LocalTunnel`` copies nothing: its ``job_dir`` must be ``$NEMORUN_HOME/experiments``, where
  nemo-run writes the sbatch script; ``--job-dir`` therefore sets nemo-run's home.
* The default packager wants a git commit; jobs run from the submitting checkout instead
  (``run.Packager()``), so the nodes must share its file system (or a container holds it).
* nemo-run rewrites ``/nemo_run`` in job paths (the run folder inside a container), so a home
  below a folder named ``nemo_run`` gets a mangled ``--output`` path and the job dies before
  it starts (``LaunchSpec`` refuses such a ``job_dir``).
* torchx and srun find ``torchrun`` on PATH: without a container, the launching venv's
  ``bin`` goes first on PATH (sbatch exports the submitter's environment to the job).
* nemo-run's SLURM job registry path is fixed when its scheduler module is imported: see
  :func:`use_nemo_run_home`.
* ``exp.run`` does not raise when the job fails: read the state back with :func:`job_status`
  (``Experiment.from_id``), which needs SLURM accounting (``sacct``) on SLURM.
* The job's working directory is nemo-run's per-launch ``code`` folder, and a container does
  not see the launching checkout: relative output paths (``logger.log_dir``,
  ``checkpointing.checkpoint_dir``) resolve under ``<job_dir>/runs/<experiment name>``
  (:func:`run_dir`), mounted into the container and the same for every launch of the recipe.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_pr2.launch.spec import RDZV_PORT_BASE, RDZV_PORT_SPAN, REPO_ROOT, LaunchSpec
from megatron_pr2.recipes.loader import Recipe, trainer_values, unsupported_parallel_keys

__all__ = [
    "DEFAULT_HOME",
    "LaunchError",
    "LaunchResult",
    "build_executor",
    "build_task",
    "ensure_venv_on_path",
    "job_logs",
    "job_status",
    "launch",
    "nemo_run_home",
    "output_dirs",
    "run_dir",
    "slurm_state",
    "submission_error",
    "use_nemo_run_home",
    "wait_for_job",
    "write_trainer_config",
]

DEFAULT_HOME = "~/.nemo_run"
TASK_NAME = "train"
SLURM_HEAD_VAR = "head_node_ip"  # nemo-run's SlurmExecutor.HEAD_NODE_IP_VAR
_PATH_KEYS = (("logger", "log_dir"), ("checkpointing", "checkpoint_dir"))
_DONE = {"SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"}


@dataclass
class LaunchResult:
    """``exp_id`` to query the job with; ``script`` is the sbatch text (or command) of a dry run."""

    exp_id: str
    config_path: Path
    script: str | None = None
    status: str | None = None


def nemo_run_home(spec: LaunchSpec) -> Path:
    return Path(os.path.expanduser(spec.job_dir or os.environ.get("NEMORUN_HOME", DEFAULT_HOME)))


def use_nemo_run_home(home: Path) -> None:
    """Point nemo-run at ``home``.

    nemo-run reads its home at import time in places: the SLURM scheduler's job registry
    (``<home>/.slurm_jobs``, which status queries look jobs up in) is a module constant. A
    process that switches homes after that import would never find its jobs again and report
    SUBMITTED forever, so the registry path moves along (and the environment carries the home).
    """
    from nemo_run.config import set_nemorun_home

    os.environ["NEMORUN_HOME"] = str(home)
    set_nemorun_home(str(home))
    scheduler = sys.modules.get("nemo_run.run.torchx_backend.schedulers.slurm")
    if scheduler is not None and hasattr(scheduler, "SLURM_JOB_DIRS"):
        scheduler.SLURM_JOB_DIRS = os.path.join(str(home), ".slurm_jobs")


def run_dir(home: Path, name: str) -> Path:
    """``<home>/runs/<name>``: where relative output paths of experiment ``name`` land.

    Stable per experiment name (not per launch, unlike nemo-run's ``experiments/<name>/<id>``),
    so a re-launch of the same recipe finds the previous launch's checkpoint and resumes; inside
    the job dir, so it is on the nodes' shared file system and mounted into a container.
    """
    return home / "runs" / name


def _trainer_default(section: str, key: str) -> str:
    from megatron_pr2.rl.config import CheckpointingConfig, LoggerConfig

    cls = {"logger": LoggerConfig, "checkpointing": CheckpointingConfig}[section]
    return str(getattr(cls(), key))


def write_trainer_config(recipe: Recipe, home: Path, name: str, strict: bool = True) -> Path:
    """The trainer's YAML: launch sections stripped, output paths made absolute.

    ``logger.log_dir`` and ``checkpointing.checkpoint_dir`` (the trainer's defaults when the
    recipe leaves them out) that are relative resolve under :func:`run_dir`: the job's working
    directory is nemo-run's per-launch ``code`` folder, and the launching checkout is not
    mounted into a container, so neither may hold a run's output. Absolute paths are kept.
    ``strict=False`` (dry runs) drops parallel sizes the trainer does not know yet instead of
    refusing them, so the sbatch script of a future layout can still be inspected.
    """
    values = trainer_values(recipe, strict=strict)
    base = run_dir(home, name)
    for section, key in _PATH_KEYS:
        node = values.get(section)
        if node is None:
            node = values[section] = {}
        if not isinstance(node, dict):
            continue  # the trainer's own validation names the bad section
        path = Path(os.path.expanduser(str(node.get(key) or _trainer_default(section, key))))
        node[key] = str(path if path.is_absolute() else (base / path).resolve())
    out = home / "pr2_configs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved by pr2 launch from {recipe.path}"
    if recipe.variants_applied:
        header += f" (variants: {', '.join(recipe.variants_applied)})"
    out.write_text(header + "\n" + yaml.safe_dump(values, sort_keys=False))
    return out


def output_dirs(config_path: Path) -> dict[str, str]:
    """``{'log_dir': ..., 'checkpoint_dir': ...}`` of a config written by
    :func:`write_trainer_config`, for the launch summary."""
    values = yaml.safe_load(config_path.read_text()) or {}
    return {key: str((values.get(section) or {}).get(key)) for section, key in _PATH_KEYS}


def ensure_venv_on_path() -> None:
    """Put this interpreter's ``bin`` first on PATH: torchx starts ``torchrun`` from PATH, and
    sbatch hands the submitter's environment to the job (an unactivated venv would otherwise
    fail with ``execve(): torchrun: No such file or directory``)."""
    bin_dir = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if not parts or parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in parts if p != bin_dir]])


def build_task(spec: LaunchSpec, config_path: Path) -> Any:
    """``pr2 train CONFIG`` (CUDA) or ``python examples/train.py CONFIG`` (CPU) as run.Script."""
    import nemo_run as run

    if spec.resolved_entry == "pr2":
        # torchrun --no-python pr2 train CONFIG: nemo-run passes --no-python for non-python
        # entrypoints; the console script must be on the nodes' PATH (venv or container).
        return run.Script(path="pr2", args=["train", str(config_path)], entrypoint="pr2")
    script = REPO_ROOT / "examples" / "train.py"
    return run.Script(path=str(script), args=[str(config_path)], entrypoint="python")


#: Shell variable the sbatch script sets to the derived rendezvous port (cluster.rdzv_port None).
RDZV_PORT_VAR = "PR2_RDZV_PORT"


def slurm_setup_lines(spec: LaunchSpec) -> str:
    """Lines of the sbatch script that run after nemo-run's setup, before ``srun``.

    nemo-run sets ``head_node_ip`` (the c10d rendezvous host) from ``hostname --ip-address`` on
    the first node, which may print several addresses, or 127.0.1.1 on Debian-style hosts.
    Instead: the first host of the allocation (``scontrol show hostnames``), as the address
    SLURM itself reaches it at (its ``NodeAddr``; the name when none is configured, which is
    the usual case). The port comes from the job id unless ``cluster.rdzv_port`` fixes it.
    """
    lines = [
        "# pr2: rendezvous on the first node of the allocation, at SLURM's address for it",
        'pr2_head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f'{SLURM_HEAD_VAR}=$(scontrol show node "$pr2_head" -o'
        " | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)",
        f"{SLURM_HEAD_VAR}=${{{SLURM_HEAD_VAR}:-$pr2_head}}",
    ]
    if spec.rdzv_port is None:
        lines.append(
            f"{RDZV_PORT_VAR}=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"
            "  # pr2: per-job rendezvous port"
        )
    return "\n".join(lines)


def _sbatch_defaults(spec: LaunchSpec) -> dict[str, Any]:
    """exclusive / cpus_per_task / mem for SlurmExecutor, minus those ``cluster.sbatch`` sets."""
    given = {str(k).replace("-", "_") for k in spec.sbatch}
    values = {
        "exclusive": True if spec.exclusive else None,
        "cpus_per_task": spec.sbatch_cpus_per_task,
        "mem": spec.mem,
    }
    return {k: v for k, v in values.items() if v is not None and k not in given}


def build_executor(spec: LaunchSpec, home: Path, name: str = "pr2") -> Any:
    """nemo-run executor with the torchrun launcher; ``home`` must be nemo-run's home.

    The SLURM job is named ``<name>.train`` (nemo-run's default prefix repeats the account).
    Its ``env`` values are shell-quoted: nemo-run writes them as ``export KEY=VALUE`` lines.
    """
    import nemo_run as run

    if spec.executor == "local":
        port = spec.rdzv_port or 29500  # single node: torchrun picks a free port anyway
        return run.LocalExecutor(
            launcher=run.Torchrun(rdzv_port=int(port)),
            ntasks_per_node=spec.procs_per_node,
            env_vars=dict(spec.env),
        )
    # the rendezvous port: a number, or the shell variable slurm_setup_lines() sets
    port: Any = int(spec.rdzv_port) if spec.rdzv_port is not None else f"${{{RDZV_PORT_VAR}}}"
    mounts = list(spec.container_mounts)
    if spec.container_image:
        # the resolved config and the run's outputs at the same paths inside the container
        for folder in (home / "pr2_configs", home / "runs"):
            folder.mkdir(parents=True, exist_ok=True)  # pyxis refuses a missing mount source
            mounts.append(f"{folder}:{folder}")
    return run.SlurmExecutor(
        account=spec.account,  # None: no --account line (an empty one would be invalid)
        job_name_prefix=f"{name}.",
        partition=spec.partition,
        nodes=int(spec.nodes),
        ntasks_per_node=spec.procs_per_node,
        gpus_per_node=int(spec.gpus_per_node) or None,
        time=str(spec.time),
        container_image=spec.container_image,
        container_mounts=mounts,
        env_vars={key: shlex.quote(value) for key, value in spec.env.items()},
        additional_parameters=dict(spec.sbatch) or None,
        setup_lines=slurm_setup_lines(spec),
        tunnel=run.LocalTunnel(job_dir=str(home / "experiments")),
        packager=run.Packager(),
        launcher=run.Torchrun(rdzv_port=port),
        **_sbatch_defaults(spec),
    )


def _dryrun_text(job: Any) -> str:
    """sbatch script (SLURM) or ``cd CWD && ENV... torchrun ...`` lines (local)."""
    info = getattr(job, "_dryrun_info", None)
    request = getattr(info, "request", None)
    if request is not None and hasattr(request, "materialize"):
        return request.materialize()
    lines = []
    for replicas in (getattr(request, "role_params", None) or {}).values():
        for params in replicas:
            env = " ".join(f"{k}={v}" for k, v in sorted(params.env.items()) if k not in ("PATH",))
            lines.append(f"cd {params.cwd} && {env} {' '.join(params.args)}")
    return "\n".join(lines) or str(info)


def launch(
    recipe: Recipe,
    spec: LaunchSpec,
    *,
    name: str,
    dryrun: bool = False,
    detach: bool = True,
    tail_logs: bool = False,
) -> LaunchResult:
    """Submit (or dry-run) the trainer job; returns the experiment id to poll."""
    import nemo_run as run

    home = nemo_run_home(spec)
    use_nemo_run_home(home)
    if not spec.container_image:
        ensure_venv_on_path()
    pending = unsupported_parallel_keys(recipe)
    if dryrun and pending:
        print(
            f"pr2 launch: warning: the trainer does not support {', '.join(pending)} yet; "
            "a real submission is refused",
            file=sys.stderr,
        )
    config_path = write_trainer_config(recipe, home, name, strict=not dryrun)
    task = build_task(spec, config_path)
    executor = build_executor(spec, home, name)
    script = None
    # A SLURM submission's chatter is held back, so that a refused sbatch (bad partition,
    # account, time) is one line instead of nemo-run's log block plus invoke's traceback.
    capture = _console_capture() if spec.executor == "slurm" and not dryrun else None
    try:
        # nemo-run's console chatter goes to stderr, so stdout carries only a dry run's script.
        with (
            capture if capture is not None else contextlib.nullcontext(),
            contextlib.redirect_stdout(sys.stderr),
            run.Experiment(name, executor=executor, log_level="WARN") as exp,
        ):
            exp.add(task, name=TASK_NAME)
            if dryrun:
                exp.dryrun(log=False)
                script = "\n".join(_dryrun_text(job) for job in exp.jobs)
            else:
                exp.run(sequential=True, detach=detach, tail_logs=tail_logs)
            exp_id = exp._id
    except Exception as exc:
        message = submission_error(exc)
        if message is None:
            if capture is not None:
                sys.stderr.write(capture.get())
            raise
        raise LaunchError(message) from None
    if capture is not None:
        sys.stderr.write(capture.get())
    return LaunchResult(exp_id=exp_id, config_path=config_path, script=script)


class LaunchError(RuntimeError):
    """A submission the scheduler refused; the message is the scheduler's own, on one line."""


class _ConsoleCapture:
    """Holds back what nemo-run's rich console prints (its log lines go through it too).

    rich's own ``Console.capture()`` buffers per thread and misses the lines nemo-run logs
    from its launch thread pool, so the console's file is swapped instead.
    """

    def __init__(self) -> None:
        from nemo_run.core.frontend.console.api import CONSOLE

        self._console = CONSOLE
        self._buffer = io.StringIO()
        self._saved: Any = None

    def __enter__(self) -> _ConsoleCapture:
        self._saved = self._console.file
        self._console.file = self._buffer
        return self

    def __exit__(self, *exc: object) -> None:
        self._console.file = self._saved

    def get(self) -> str:
        return self._buffer.getvalue()


def _console_capture() -> _ConsoleCapture:
    return _ConsoleCapture()


def submission_error(exc: BaseException) -> str | None:
    """``sbatch failed (exit 1): sbatch: error: invalid partition specified: x`` from the
    exception of a command nemo-run ran (invoke's ``UnexpectedExit`` carries the command's
    result), or None for any other exception (a bug: its traceback is kept)."""
    result = getattr(exc, "result", None)
    command = str(getattr(result, "command", "") or "")
    if result is None or not command:
        return None
    output = str(getattr(result, "stderr", "") or "") or str(getattr(result, "stdout", "") or "")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    program = command.split()[0]
    code = getattr(result, "exited", "?")
    return f"{program} failed (exit {code}): " + (" | ".join(lines) or "no output")


def job_status(exp_id: str, home: Path | None = None) -> dict[str, Any]:
    """``{'status': SUCCEEDED|FAILED|RUNNING|..., 'job_id': ...}`` of the experiment's job."""
    import nemo_run as run

    if home is not None:
        use_nemo_run_home(home)
    exp = run.Experiment.from_id(exp_id)
    states = exp.status(return_dict=True) or {}
    state = states.get(TASK_NAME) or next(iter(states.values()), {})
    status = state.get("status")
    return {**state, "status": str(getattr(status, "name", status))}


#: sacct states that say more than nemo-run's FAILED (torchx maps them all to FAILED).
SLURM_END_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def slurm_state(job_id: Any) -> str | None:
    """The job's end state from ``sacct`` (``TIMEOUT``, ``CANCELLED`` for "CANCELLED by 0",
    ``OUT_OF_MEMORY``...), ``SUCCEEDED`` for COMPLETED, or None (no sacct, not a SLURM id)."""
    if not str(job_id or "").isdigit() or shutil.which("sacct") is None:
        return None
    try:
        done = subprocess.run(
            ["sacct", "-n", "-X", "--parsable2", "-j", str(job_id), "-o", "State"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    state = words[0].rstrip("+") if done.returncode == 0 and words else ""
    if state == "COMPLETED":
        return "SUCCEEDED"
    return state if state in SLURM_END_STATES else None


def wait_for_job(
    exp_id: str, home: Path | None = None, timeout_s: float = 600.0, poll_s: float = 3.0
) -> str:
    """Poll :func:`job_status` until the job ends; raises ``TimeoutError`` past ``timeout_s``.

    A SLURM job that did not succeed is reported by its sacct state (:func:`slurm_state`), so
    a time limit, a cancellation or an out-of-memory kill is not just "FAILED".
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_status(exp_id, home)
        status = str(state["status"]).upper()
        if status in _DONE:
            if status != "SUCCEEDED":
                status = slurm_state(state.get("job_id")) or status
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{exp_id}: still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def job_logs(home: Path, exp_id: str) -> list[Path]:
    """The job's log files (SLURM: ``log-*.out`` of srun and ``sbatch_*.out``; local:
    ``*.log``), for a failure message."""
    found: set[Path] = set()
    for exp_dir in (home / "experiments").glob(f"*/{exp_id}"):
        for pattern in ("log-*.out", "sbatch_*.out", "*.log"):
            found.update(p for p in exp_dir.rglob(pattern) if "code" not in p.parts)
    return sorted(found)
