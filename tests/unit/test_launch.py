"""``pr2 launch`` without nemo-run: cluster settings, flags, the trainer config it writes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

from megatron_pr2.launch.spec import REPO_ROOT, LaunchSpec, cluster_from_section
from megatron_pr2.recipes.loader import RecipeError, load_recipe

RECIPES = REPO_ROOT / "examples" / "recipes"


def test_spec_defaults_and_world():
    spec = LaunchSpec()
    assert (spec.executor, spec.nodes, spec.gpus_per_node, spec.world_size) == ("slurm", 1, 8, 8)
    assert spec.resolved_entry == "pr2"
    cpu = LaunchSpec(nodes=2, gpus_per_node=0)
    assert (cpu.procs_per_node, cpu.world_size, cpu.resolved_entry) == (1, 2, "examples")
    assert LaunchSpec(gpus_per_node=8, nproc_per_node=4, nodes=2).world_size == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"executor": "k8s"}, "cluster.executor must be slurm or local"),
        ({"time": "4h"}, "cluster.time must be"),
        ({"executor": "local", "nodes": 2}, "nodes must be 1"),
        ({"nodes": 0}, "cluster.nodes must be >= 1"),
        ({"entry": "python"}, "cluster.entry must be"),
        ({"job_dir": "/shared/nemo_run/home"}, "may be named 'nemo_run'"),
        ({"mem": "lots"}, "cluster.mem must be a SLURM size"),
        ({"cpus_per_task": -1}, "cluster.cpus_per_task must be >= 0"),
        ({"rdzv_port": 70000}, "cluster.rdzv_port must be a TCP port"),
    ],
)
def test_spec_rejects(values, message):
    with pytest.raises(ValueError, match=message):
        LaunchSpec(**values)


def test_sbatch_resource_defaults():
    """One torchrun task per node owns the cores of all its ranks; whole node, all memory."""
    gpu = LaunchSpec(nodes=4, gpus_per_node=8)
    assert (gpu.exclusive, gpu.mem, gpu.rdzv_port, gpu.sbatch_cpus_per_task) == (
        True,
        "0",
        None,
        64,
    )
    assert LaunchSpec(gpus_per_node=0, nproc_per_node=2).sbatch_cpus_per_task == 2
    assert LaunchSpec(cpus_per_task=12).sbatch_cpus_per_task == 12
    assert LaunchSpec(cpus_per_task=0).sbatch_cpus_per_task is None
    assert LaunchSpec(mem=0).mem == "0"  # YAML `mem: 0` is an int


def test_flags_override_the_recipe():
    section = {"nodes": 4, "env": {"A": "1"}, "container_mounts": ["/a:/a"], "partition": "p"}
    spec = cluster_from_section(
        section,
        {"nodes": 8, "env": {"B": "2"}, "container_mounts": ["/b:/b"], "partition": None},
    )
    assert spec.nodes == 8 and spec.partition == "p"
    assert spec.env == {"A": "1", "B": "2"}
    assert spec.container_mounts == ["/a:/a", "/b:/b"]
    with pytest.raises(ValueError, match=r"unknown config key 'cluster\.gpus'"):
        cluster_from_section({"gpus": 8})


def test_cli_flags_parse():
    from megatron_pr2.commands import launch as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "launch",
            "r.yaml",
            "grpo.max_num_steps=3",
            "--executor",
            "slurm",
            "--nodes",
            "2",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--container-mounts",
            "/a:/a,/b:/b",
            "--time",
            "00:30:00",
            "--dryrun",
        ]
    )
    flags = command._flags(args)
    assert args.overrides == ["grpo.max_num_steps=3"] and args.dryrun
    assert flags["env"] == {"A": "1", "B": "x=y"}
    assert flags["container_mounts"] == ["/a:/a", "/b:/b"]
    assert (flags["nodes"], flags["time"], flags["gpus_per_node"]) == (2, "00:30:00", None)


def test_launch_commands_are_registered():
    from megatron_pr2.commands import COMMAND_MODULES

    assert "megatron_pr2.commands.launch" in COMMAND_MODULES
    assert "megatron_pr2.commands.check_recipe" in COMMAND_MODULES


def test_write_trainer_config(tmp_path: Path):
    """Launch sections stripped, relative output paths under the job dir, the trainer accepts
    the file."""
    from megatron_pr2.launch.nemo import output_dirs, write_trainer_config
    from megatron_pr2.rl.config import load_config

    recipe = load_recipe(RECIPES / "tiny" / "slurm_2nodes.yaml")
    path = write_trainer_config(recipe, tmp_path, "t")
    values = yaml.safe_load(path.read_text())
    assert "cluster" not in values and "defaults" not in values
    assert values["logger"]["log_dir"] == str(tmp_path / "runs" / "t" / "logs" / "tiny_slurm")
    config = load_config(path)
    assert config.grpo.max_num_steps == 2
    assert output_dirs(path)["log_dir"] == config.logger.log_dir


def test_outputs_are_stable_per_experiment_under_the_job_dir(tmp_path: Path, monkeypatch):
    """Both output paths land in ``<job_dir>/runs/<name>`` (mounted; never the launching
    checkout, never nemo-run's per-launch folder), also ``checkpoint_dir`` when the recipe
    leaves it to the trainer's relative default; a second launch of the same experiment gets
    the same folders, so it resumes from the first launch's checkpoint. Absolute paths stay."""
    from megatron_pr2.launch.nemo import write_trainer_config

    monkeypatch.chdir(tmp_path)  # the launching directory must not matter
    recipe = load_recipe(RECIPES / "tiny" / "slurm_2nodes.yaml", ["checkpointing.enabled=true"])
    home = tmp_path / "home"
    first = yaml.safe_load(write_trainer_config(recipe, home, "exp").read_text())
    monkeypatch.setattr("os.getpid", lambda: 1)  # another launch: another config file
    second_path = write_trainer_config(recipe, home, "exp")
    second = yaml.safe_load(second_path.read_text())
    run = home / "runs" / "exp"
    assert first["checkpointing"]["checkpoint_dir"] == str(run / "results" / "grpo")
    assert first["logger"]["log_dir"] == str(run / "logs" / "tiny_slurm")
    for section, key in (("logger", "log_dir"), ("checkpointing", "checkpoint_dir")):
        assert second[section][key] == first[section][key]
    absolute = load_recipe(
        RECIPES / "tiny" / "slurm_2nodes.yaml", [f"checkpointing.checkpoint_dir={tmp_path}/c"]
    )
    values = yaml.safe_load(write_trainer_config(absolute, home, "exp").read_text())
    assert values["checkpointing"]["checkpoint_dir"] == f"{tmp_path}/c"


def test_submission_refuses_a_layout_the_trainer_lacks(tmp_path: Path, monkeypatch):
    """A parallel size the trainer cannot apply is never dropped silently from a real launch
    (simulated: the trainer's PolicyConfig without expert parallelism)."""
    from megatron_pr2.launch.nemo import write_trainer_config
    from megatron_pr2.recipes import loader

    fields = loader._trainer_policy_fields() - {"expert_model_parallel_size"}
    monkeypatch.setattr(loader, "_trainer_policy_fields", lambda: fields)
    recipe = load_recipe(RECIPES / "olmoe_1b_7b" / "pr2.yaml")
    assert loader.unsupported_parallel_keys(recipe) == ["policy.expert_model_parallel_size=8"]
    with pytest.raises(RecipeError, match="expert_model_parallel_size=8"):
        write_trainer_config(recipe, tmp_path, "t")
    path = write_trainer_config(recipe, tmp_path, "t", strict=False)  # dry runs may show it
    assert "expert_model_parallel_size" not in path.read_text()
    unused = load_recipe(
        RECIPES / "tiny" / "slurm_2nodes.yaml", ["policy.expert_model_parallel_size=1"]
    )
    assert loader.unsupported_parallel_keys(unused) == []  # "not used" values are just dropped
    write_trainer_config(unused, tmp_path, "t")


def test_launch_without_nemo_run_says_how_to_install(monkeypatch, capsys):
    import builtins

    from megatron_pr2.commands import launch as command

    real_import = builtins.__import__

    def no_nemo(name, *args, **kwargs):
        if name == "nemo_run" or name.startswith("nemo_run."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nemo)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["launch", str(RECIPES / "tiny" / "slurm_2nodes.yaml"), "--dryrun"])
    assert command.run(args) == 2
    assert "nemo-run==0.11.1" in capsys.readouterr().err


def test_launch_refuses_a_broken_recipe(capsys):
    """The recipe check runs before nemo-run is touched: a bad layout never reaches sbatch."""
    from megatron_pr2.commands import launch as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    recipe = str(RECIPES / "qwen3_30b_a3b" / "pr2.yaml")
    args = parser.parse_args(["launch", recipe, "policy.expert_model_parallel_size=6", "--dryrun"])
    assert command.run(args) == 1
    err = capsys.readouterr().err
    assert "does not divide the 128 routed experts" in err and "FAILED" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["launch", "r.yaml", "--dryrun", "grpo.max_num_steps=3"], ["grpo.max_num_steps=3"]),
        (
            ["launch", "r.yaml", "a.b=1", "--nodes", "2", "c=x y", "--dryrun", "d.e-f=2"],
            ["a.b=1", "c=x y", "d.e-f=2"],
        ),
        (["check-recipe", "r.yaml", "--nodes", "2", "policy.lr=1e-6"], ["policy.lr=1e-6"]),
    ],
)
def test_overrides_are_accepted_after_flags(argv, expected):
    """``pr2 launch R --dryrun grpo.max_num_steps=3``: key=value words after flags are
    overrides, in command-line order (argparse alone refuses them)."""
    from megatron_pr2.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.overrides == expected and args.recipe == "r.yaml"


def test_stray_words_after_flags_are_still_refused(capsys):
    from megatron_pr2.cli import build_parser

    for stray in ("--bogus=1", "notanoverride"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["launch", "r.yaml", "--dryrun", stray])
        assert "unrecognized arguments" in capsys.readouterr().err


def _fake_sacct(tmp_path: Path, monkeypatch, output: str) -> None:
    """A ``sacct`` on PATH that prints ``output`` (what ``-o State`` prints for the job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sacct = bin_dir / "sacct"
    sacct.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\n")
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize(
    ("sacct", "expected"),
    [
        ("TIMEOUT", "TIMEOUT"),
        ("CANCELLED by 0", "CANCELLED"),
        ("OUT_OF_MEMORY", "OUT_OF_MEMORY"),
        ("NODE_FAIL", "NODE_FAIL"),
        ("FAILED", "FAILED"),
    ],
)
def test_wait_reports_slurm_end_states(tmp_path: Path, monkeypatch, sacct, expected):
    """nemo-run (torchx) says FAILED for a time limit, a cancel or an OOM kill alike; sacct
    tells them apart."""
    from megatron_pr2.launch import nemo

    _fake_sacct(tmp_path, monkeypatch, sacct)
    monkeypatch.setattr(
        nemo, "job_status", lambda exp_id, home: {"status": "FAILED", "job_id": "7"}
    )
    assert nemo.wait_for_job("e", tmp_path, timeout_s=5, poll_s=0) == expected


def test_wait_keeps_nemo_runs_state_without_sacct(tmp_path: Path, monkeypatch):
    from megatron_pr2.launch import nemo

    _fake_sacct(tmp_path, monkeypatch, "RUNNING")  # not an end state: ignored
    monkeypatch.setattr(
        nemo, "job_status", lambda exp_id, home: {"status": "FAILED", "job_id": "7"}
    )
    assert nemo.wait_for_job("e", tmp_path, timeout_s=5, poll_s=0) == "FAILED"
    monkeypatch.setattr(
        nemo, "job_status", lambda exp_id, home: {"status": "FAILED", "job_id": "local-x"}
    )
    assert nemo.wait_for_job("e", tmp_path, timeout_s=5, poll_s=0) == "FAILED"


def test_wait_failure_prints_the_log_path(tmp_path: Path, monkeypatch, capsys):
    """``pr2 launch --wait``: a failed job's status line is followed by its log files."""
    import sys
    import types

    from megatron_pr2.commands import launch as command
    from megatron_pr2.launch import nemo

    home = tmp_path / "home"
    exp_dir = home / "experiments" / "pr2-tiny" / "pr2-tiny_1"
    log = exp_dir / "train" / "log-pr2-tiny.train_7_0.out"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback ...\n")
    (exp_dir / "train" / "code").mkdir()
    (exp_dir / "train" / "code" / "log-not-this.out").write_text("")
    monkeypatch.setitem(sys.modules, "nemo_run", types.ModuleType("nemo_run"))

    def fake_launch(recipe, spec, *, name, **kwargs):
        config = nemo.write_trainer_config(recipe, home, name)
        return nemo.LaunchResult(exp_id="pr2-tiny_1", config_path=config)

    monkeypatch.setattr(nemo, "launch", fake_launch)
    monkeypatch.setattr(nemo, "wait_for_job", lambda exp_id, home, timeout_s: "TIMEOUT")
    monkeypatch.setattr(nemo, "job_status", lambda exp_id, home: {"job_id": "7"})
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    recipe = str(RECIPES / "tiny" / "slurm_2nodes.yaml")
    args = parser.parse_args(
        ["launch", recipe, "--job-dir", str(home), "--job-name", "pr2-tiny", "--wait"]
    )
    assert command.run(args) == 1
    out = capsys.readouterr().out
    assert "experiment pr2-tiny_1: TIMEOUT (job 7)" in out
    assert f"  log: {log}" in out.splitlines()
    assert "log-not-this" not in out
    assert f"metrics {home}/runs/pr2-tiny/logs/tiny_slurm/metrics.jsonl" in out


@pytest.mark.parametrize(
    ("node_line", "expected"),
    [
        (
            "NodeName=gpu-a01 Arch=x86_64 CoresPerSocket=56 NodeAddr=10.1.2.3 NodeHostName=a01",
            "10.1.2.3",
        ),
        ("", "gpu-a01"),  # no NodeAddr known: the host name itself
    ],
)
def test_slurm_setup_lines_pick_the_rendezvous_host_and_port(
    tmp_path: Path, node_line: str, expected: str
):
    """The sbatch setup lines, run by bash against a stand-in ``scontrol``: the first host of
    the allocation (not ``hostname --ip-address``), and a port derived from the job id."""
    import subprocess

    from megatron_pr2.launch.nemo import slurm_setup_lines
    from megatron_pr2.launch.spec import RDZV_PORT_BASE, RDZV_PORT_SPAN

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "gpu-a01\\ngpu-a02\\n"; exit 0; fi\n'
        f"printf '%s\\n' '{node_line}'\n"
    )
    scontrol.chmod(0o755)
    script = slurm_setup_lines(LaunchSpec(nodes=2)) + '\necho "$head_node_ip:$PR2_RDZV_PORT"'
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_JOB_ID": "123457",
    }
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    port = RDZV_PORT_BASE + 123457 % RDZV_PORT_SPAN
    assert done.stdout.strip() == f"{expected}:{port}", done.stderr
    assert port < 32768  # below Linux's ephemeral range
    fixed = slurm_setup_lines(LaunchSpec(nodes=2, rdzv_port=29600))
    assert "PR2_RDZV_PORT" not in fixed
