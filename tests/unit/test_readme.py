"""README.md says only what runs: its python blocks are marked excerpts of example files that
these tests run, its main-job and test commands are the ones CI and these tests run, and every
metric name it lists is written by a short run of that main job."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: Example files whose marked regions the README may show; each is run below.
EXCERPT_FILES = ("examples/replay_api.py",)
MAIN_JOB = ".venv/bin/python examples/train.py"
#: The command that writes the main job's assets (toy model, tokenizer, data) next to its recipe.
ASSETS = ".venv/bin/python tools/make_smoke_assets.py"
RECIPE_DIR = "examples/recipes/qwen3_30b_a3b"
#: Shrinks the README's main job to seconds; the metric names do not depend on these sizes.
SHORT_RUN = [
    "grpo.max_num_steps=1",
    "grpo.sft_warmup_steps=2",
    "grpo.sft_batch_size=4",
    "grpo.num_prompts_per_step=2",
    "grpo.num_generations_per_prompt=4",
    "grpo.off_policy_steps=2",
    "policy.micro_batch_size=2",
    "logger.tensorboard_enabled=false",
    "logger.progress_bar=false",
    "grpo.val_period=1",
    "grpo.max_val_samples=4",
    # the optional metric groups the README names: drift probe and planned dispatch
    "logger.drift_probe_tokens=8",
    "policy.router_replay.planned_dispatch=true",
]


def _blocks(language: str) -> list[str]:
    """The fenced code blocks of README.md in ``language``, text without the fences."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    return pattern.findall(README.read_text())


def _excerpts(path: Path) -> dict[str, str]:
    """``# [readme:NAME]`` ... ``# [/readme:NAME]`` regions of ``path``, dedented."""
    found: dict[str, str] = {}
    text = path.read_text()
    for match in re.finditer(
        r"^[ \t]*# \[readme:([\w-]+)\]\n(.*?)^[ \t]*# \[/readme:\1\]$",
        text,
        re.MULTILINE | re.DOTALL,
    ):
        found[match.group(1)] = textwrap.dedent(match.group(2))
    return found


def _load(relative: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- python blocks
def test_every_python_block_is_a_marked_excerpt_of_a_tested_file():
    excerpts = {
        f"{name}:{region}": text
        for name in EXCERPT_FILES
        for region, text in _excerpts(REPO / name).items()
    }
    blocks = _blocks("python")
    assert blocks, "README.md has no python block"
    for block in blocks:
        assert block in excerpts.values(), (
            "this README python block is not byte-identical to any marked excerpt of "
            f"{', '.join(EXCERPT_FILES)}:\n{block}"
        )
    unused = [key for key, text in excerpts.items() if text not in blocks]
    assert not unused, f"marked excerpts the README does not show: {unused}"


def test_the_excerpted_example_runs_r2_then_pr2(world1):
    example = _load("examples/replay_api.py")
    r2 = example.r2_replay(num_mini_steps=2)
    assert r2["router_replay/fallback_tokens"] == 0  # every token replayed a recorded route
    assert r2["router_replay/tokens"] > 0
    assert 0.0 < r2["router_replay/replay_agreement"] <= 1.0
    pr2, predictor_norm = example.pr2_replay(num_mini_steps=2)
    assert math.isfinite(pr2["pr2/predictive_loss"])
    assert predictor_norm > 0.0  # it starts at zero: mini-step 1 trained it


# --------------------------------------------------------------------------- bash blocks
def _commands(block: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, split on ``&&``."""
    joined = block.replace("\\\n", " ")
    return [c.strip() for line in joined.splitlines() for c in line.split("&&") if c.strip()]


def _ci_commands() -> list[str]:
    """``.ci/run``'s commands without its quieting (``-q`` for pip, pip's log filter)."""
    out = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        line = line.split(" 2>&1 |")[0].strip()
        if line.startswith(".venv/bin/pip install"):
            line = line.replace(" -q ", " ")
        out.append(line)
    return out


def test_quick_start_installs_as_ci_does_and_tests_as_ci_does():
    bash = [c for block in _blocks("bash") for c in _commands(block)]
    ci = _ci_commands()
    pip = [c for c in bash if c.startswith(".venv/bin/pip install")]
    assert pip and all(c in ci for c in pip), (pip, [c for c in ci if "pip install" in c])
    pytest_commands = [c for c in bash if c.startswith(".venv/bin/python -m pytest")]
    assert pytest_commands
    for command in pytest_commands:  # CI adds only -p no:cacheprovider
        assert f"{command} -p no:cacheprovider" in ci, command
    assert any(c.startswith(MAIN_JOB) for c in bash)


def test_commands_after_the_quick_start_say_how_to_find_pr2():
    text = README.read_text()
    activate = text.find("source .venv/bin/activate")
    # a command line: a bash-block line or a code span running a subcommand with arguments
    first_bare = re.search(r"^pr2 \w|`pr2 [\w-]+ \S", text, re.MULTILINE)
    assert first_bare is not None
    assert 0 <= activate < first_bare.start(), "a bare `pr2` command before the venv note"


# --------------------------------------------------------------------------- metric names
def _expand(pattern: str) -> list[str]:
    """Regexes for a README metric name: ``{a,b}`` alternatives (nested too), ``{n}`` a
    number, ``*`` one path segment."""
    depth, start = 0, -1
    for i, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                inner, head, tail = pattern[start + 1 : i], pattern[:start], pattern[i + 1 :]
                parts, level, last = [], 0, 0
                for j, c in enumerate(inner):
                    level += c == "{"
                    level -= c == "}"
                    if c == "," and level == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                if len(parts) == 1:  # a placeholder such as {n} or {i}
                    return [re.escape(head) + r"\d+" + rest for rest in _expand(tail)]
                return [r for part in parts for r in _expand(head + part + tail)]
    return ["[^/]+".join(re.escape(piece) for piece in pattern.split("*"))]


def test_expand_reads_the_readme_forms():
    regexes = _expand("train/router_replay/{zero_deviation_ratio,topk_deviation_{0,ge3}}/layer_{n}")
    assert len(regexes) == 3
    assert re.fullmatch(regexes[2], "train/router_replay/topk_deviation_ge3/layer_12")
    assert not any(re.fullmatch(r, "train/router_replay/topk_deviation_1/layer_1") for r in regexes)
    assert re.fullmatch(_expand("timing/train/*")[0], "timing/train/generation")


def _readme_metric_names() -> tuple[list[str], list[str]]:
    """Code spans that name metrics: trainer names (``train/``, ``timing/``, ``sft/``, ``drift/``,
    ``validation/``: keys of
    ``metrics.jsonl``) and session names (``router_replay/``, ``pr2/``: ``session.metrics()``,
    which the trainer writes under ``train/`` or, for the old-log-prob pass, ``train/logprobs/``)."""
    prose = re.sub(r"^```.*?^```$", "", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    spans = ["".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    name = r"[\w{},*/]+"
    trainer = [s for s in spans if re.fullmatch(rf"(train|timing|sft|validation|drift)/{name}", s)]
    session = [s for s in spans if re.fullmatch(rf"(router_replay|pr2)/{name}", s)]
    return trainer, session


def test_readme_main_job_runs_and_writes_every_metric_the_readme_names(tmp_path):
    """The quick start's asset and main-job commands as written, on a copy of the recipe
    folder (so the test neither needs nor touches the checkout's ``smoke/``)."""
    bash = [c for block in _blocks("bash") for c in _commands(block)]
    assets = next(c for c in bash if c.startswith(ASSETS))
    main_job = next(c for c in bash if c.startswith(MAIN_JOB))
    assert RECIPE_DIR in assets and RECIPE_DIR in main_job, (assets, main_job)
    recipe_copy = tmp_path / "recipe"
    shutil.copytree(REPO / RECIPE_DIR, recipe_copy, ignore=shutil.ignore_patterns("smoke"))
    log_dir = tmp_path / "run"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    runs = [
        shlex.split(assets.replace(RECIPE_DIR, str(recipe_copy))),
        [
            *shlex.split(main_job.replace(RECIPE_DIR, str(recipe_copy))),
            *SHORT_RUN,
            f"logger.log_dir={log_dir}",
        ],
    ]
    for argv in runs:
        argv[0] = sys.executable
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
    assert f"results: {log_dir}/metrics.jsonl" in done.stdout
    keys = set()
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))

    trainer, session = _readme_metric_names()
    assert len(trainer) >= 10 and len(session) >= 5, (trainer, session)
    missing = []
    for name in trainer:
        for regex in _expand(name):
            if not any(re.fullmatch(regex, k) for k in keys):
                missing.append(f"{name} ({regex})")
    for name in session:
        for regex in _expand(name):
            if not any(re.fullmatch(rf"train/(logprobs/)?{regex}", k) for k in keys):
                missing.append(f"{name} ({regex})")
    assert not missing, f"README names metrics the main job does not write: {missing}"
