"""A torchrun rank of the GRPO trainer with math_verify's grades recorded (test-only).

``python -m torch.distributed.run --nproc-per-node N -m tests.support.torchrun_trainer CONFIG
GRADES_DIR [key=value ...]`` runs what ``examples/train.py CONFIG`` runs under torchrun (CPU
shim, gloo group from torchrun's environment, ``train``), and appends every
``(response, answer, grade)`` that ``math_verify`` returns on this rank to
``GRADES_DIR/rank{RANK}.jsonl``: a test in another process can then check that the logged
rewards are math_verify's grades, which the metrics alone cannot show.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    config_path, grades_dir, *overrides = argv
    from megatron_pr2.rl import reward
    from megatron_pr2.rl.config import load_config
    from tests.support.dist import init_process  # installs the CPU shim first

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = load_config(config_path, overrides)  # a bad key fails before the group exists
    grades = Path(grades_dir) / f"rank{rank}.jsonl"
    grades.parent.mkdir(parents=True, exist_ok=True)
    real = reward.math_verify_reward

    def recorded(response: str, answer: str) -> float:
        value = real(response, answer)
        with grades.open("a") as out:
            out.write(json.dumps([response, answer, value]) + "\n")
        return value

    reward.math_verify_reward = recorded  # make_reward looks the name up when it is called
    init_process(rank, world, int(os.environ["MASTER_PORT"]))
    from megatron_pr2.rl.trainer import train

    train(config)


if __name__ == "__main__":
    main(sys.argv[1:])
