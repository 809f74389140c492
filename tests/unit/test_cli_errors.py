"""Entry points report user mistakes in one line (exit 2) and keep tracebacks for bugs;
``pr2 info`` is quick and quiet (no megatron-core import, so none of its TE/apex warnings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pr2 import cli
from megatron_pr2.errors import USER_ERROR_EXIT_CODE, ConfigError
from megatron_pr2.rl.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny" / "grpo_tiny.yaml")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-W", "default", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_config_file_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    done = _python("examples/train.py", str(missing))
    assert done.returncode == USER_ERROR_EXIT_CODE, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"train.py: error: cannot read config file {missing}: No such file or directory"
    ]


def test_config_errors_are_config_errors_and_still_value_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="task"):  # a section's own check, named
        load_config(TINY, ["task.kind=mul"])
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        load_config(TINY, ["nope=1"])


def test_pr2_train_bad_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", TINY, "grpo.nope=1"])
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == ["pr2: error: unknown config key 'grpo.nope'"]


def test_bugs_keep_their_traceback(monkeypatch):
    from megatron_pr2.commands import info

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def test_pr2_info_is_quiet_and_does_not_import_megatron():
    done = _python(
        "-c",
        "import sys\n"
        "from megatron_pr2.cli import main\n"
        "try:\n    main(['info'])\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('megatron imported:', 'megatron.core' in sys.modules)\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "megatron-core " in done.stdout and "(tested: " in done.stdout
    assert "megatron imported: False" in done.stdout


def test_cli_filters_only_megatrons_te_apex_warnings():
    done = _python(
        "-c",
        "import warnings\n"
        "from megatron_pr2.cli import silence_megatron_import_warnings\n"
        "silence_megatron_import_warnings()\n"
        "import tests\n"  # the CPU shim (0.19 needs it to import megatron at all)
        "import megatron.core.optimizer\n"
        "warnings.warn('another warning')\n",
    )
    assert done.returncode == 0, done.stderr
    assert "Transformer Engine and Apex" not in done.stderr
    assert "another warning" in done.stderr


def test_pr2_compare_on_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [
        f"pr2: error: {tmp_path}: no metrics.jsonl (not a pr2 run directory?)"
    ]
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [
        f"pr2: error: {tmp_path}: metrics.jsonl holds no step"
    ]
