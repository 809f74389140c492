"""A recipe whose model weights were never converted is refused with the exact convert command:
by ``pr2 check-recipe``, by ``pr2 launch`` (a dry run warns), and by the trainer itself."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from megatron_pr2.convert.required import NotConvertedError, convert_command, require_converted
from megatron_pr2.errors import UserError
from megatron_pr2.recipes.check import check_recipe
from megatron_pr2.recipes.loader import load_recipe

ROOT = Path(__file__).resolve().parents[2]
QWEN = ROOT / "examples" / "recipes" / "qwen3_30b_a3b" / "pr2.yaml"


def _qwen(tmp_path: Path, *overrides: str, variants: tuple[str, ...] = ()):
    ckpt = tmp_path / "qwen-mcore"
    base = ["model.hf_path=/models/Qwen3-30B-A3B-Base", f"model.checkpoint={ckpt}"]
    return ckpt, load_recipe(QWEN, [*base, *overrides], variants)


def test_convert_command_names_the_layout():
    assert convert_command("/hf/m", "/out") == "pr2 convert hf-to-mcore /hf/m /out --dtype bfloat16"
    assert convert_command("/hf/m", "/o", tp=2, pp=2, ep=8, etp=1) == (
        "pr2 convert hf-to-mcore /hf/m /o --dtype bfloat16 --tp 2 --pp 2 --ep 8 --etp 1"
    )
    assert convert_command(None, "/o", tp=2, etp=2).endswith(
        "<HF model folder> /o --dtype bfloat16 --tp 2"
    )


def test_check_recipe_refuses_unconverted_weights_with_the_command(tmp_path: Path):
    ckpt, recipe = _qwen(tmp_path)
    result = check_recipe(recipe)
    assert not result.ok
    expected = f"pr2 convert hf-to-mcore /models/Qwen3-30B-A3B-Base {ckpt} --dtype bfloat16 --ep 8"
    assert any(f"model.checkpoint={ckpt} is not a converted checkpoint" in e for e in result.errors)
    assert any(expected in e for e in result.errors), result.errors
    # the 8-node layout's flags
    _, nodes8 = _qwen(tmp_path, variants=("nodes8",))
    assert any("--tp 2 --pp 2 --ep 8 --etp 1" in e for e in check_recipe(nodes8).errors)
    # a dry run only warns
    warned = check_recipe(recipe, missing_weights="warn")
    assert warned.ok and any(expected in w for w in warned.warnings)


def test_converted_weights_or_random_init_pass(tmp_path: Path):
    ckpt, recipe = _qwen(tmp_path)
    ckpt.mkdir()
    (ckpt / "pr2_model.json").write_text("{}")
    assert check_recipe(recipe).ok
    tokenizer = "policy.tokenizer.name=/models/tokenizer"  # data files need one
    _, smoke = _qwen(tmp_path / "elsewhere", "model.random_init=true", tokenizer)
    assert check_recipe(smoke).ok


def test_launch_refuses_before_submitting(tmp_path: Path, capsys):
    from megatron_pr2.commands import launch as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    ckpt = tmp_path / "missing"
    args = parser.parse_args(
        ["launch", str(QWEN), "model.hf_path=/hf/q", f"model.checkpoint={ckpt}"]
    )
    assert command.run(args) == 1
    err = capsys.readouterr().err
    assert f"pr2 convert hf-to-mcore /hf/q {ckpt} --dtype bfloat16 --ep 8" in err


def test_launch_dryrun_warns(tmp_path: Path):
    """A dry run prints the job anyway (stdout) and the refusal as a warning (stderr)."""
    pytest.importorskip("nemo_run")
    import subprocess
    import sys

    ckpt = tmp_path / "missing"
    argv = ["launch", str(QWEN), "model.hf_path=/hf/q", f"model.checkpoint={ckpt}", "--dryrun"]
    argv += ["--job-dir", str(tmp_path / "home")]
    done = subprocess.run(
        [sys.executable, "-c", "from megatron_pr2.cli import main; main()", *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("#!/bin/bash\n")
    assert "pr2 launch: warning: model.checkpoint=" in done.stderr
    assert f"hf-to-mcore /hf/q {ckpt} --dtype bfloat16 --ep 8" in done.stderr


def test_trainer_refuses_an_unconverted_model_path(tmp_path: Path):
    """One line, a user error, before the tokenizer is looked for in that folder."""
    with pytest.raises(NotConvertedError) as info:
        require_converted(tmp_path, tp=1, ep=2)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message
    assert f"policy.model_path={tmp_path} is not a converted checkpoint" in message
    assert (
        f"pr2 convert hf-to-mcore <HF model folder> {tmp_path} --dtype bfloat16 --ep 2" in message
    )


def test_train_entry_point_says_the_same(world1, tmp_path: Path):
    from megatron_pr2.rl.config import load_config
    from megatron_pr2.rl.trainer import training_steps

    config = load_config(
        "examples/tiny/grpo_tiny.yaml",
        [f"policy.model_path={tmp_path}", f"logger.log_dir={tmp_path / 'logs'}"],
    )
    with pytest.raises(NotConvertedError, match="pr2 convert hf-to-mcore"):
        next(training_steps(config))
