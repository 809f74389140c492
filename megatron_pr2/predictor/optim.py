"""The predictor's optimizer group, built with megatron's own ``config_overrides``.

Predictor parameters (tagged ``is_evolution_predictor``) get their own param group with
``max_lr = lr_mult x lr`` (and ``min_lr`` likewise), weight decay 0, and a ``pr2_predictor``
marker that survives in the optimizer state dict, so the group can be found again after a
checkpoint resume. On mini-steps without a predictor loss the group is frozen for that step:
lr 0 and weight decay 0, so neither Adam's moments nor decay move the predictor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from megatron_pr2.predictor.module import PREDICTOR_ATTR

GROUP_MARKER = "pr2_predictor"


def predictor_config_overrides(optimizer_config: Any, lr_mult: float) -> dict:
    """megatron's standard overrides plus the predictor group, for ``get_megatron_optimizer``."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = dict(get_standard_config_overrides(optimizer_config))
    if lr_mult == 1.0:
        raise ValueError(
            "predictor lr_mult=1.0 would make the predictor group indistinguishable from "
            "megatron's no-weight-decay group on checkpoint load; use a multiplier != 1"
        )
    predictor_group = {
        "max_lr": optimizer_config.lr * lr_mult,
        "min_lr": (optimizer_config.min_lr or 0.0) * lr_mult,
        "wd_mult": 0.0,
        # The scheduler ignores lr_mult (max_lr carries the multiplier), but megatron matches
        # saved and live param groups on (wd_mult, lr_mult, ...) when loading an optimizer
        # checkpoint; a distinct lr_mult keeps the predictor group from collapsing into the
        # no-weight-decay group (a bug the reference implementation hit).
        "lr_mult": lr_mult,
        GROUP_MARKER: True,
    }
    overrides[ParamKey(attr=PREDICTOR_ATTR)] = predictor_group
    return overrides


def predictor_groups(optimizer: Any) -> list[dict]:
    return [group for group in optimizer.param_groups if group.get(GROUP_MARKER)]


def apply_group_lrs(optimizer: Any) -> None:
    """Set every group's lr to its ``max_lr`` and weight decay to ``wd_mult`` x the group's.

    Only for runs without megatron's ``OptimizerParamScheduler`` (which does this itself).
    """
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["lr"] = group["max_lr"]
        if "wd_mult" in group and "weight_decay" in group:
            group["weight_decay"] = group["weight_decay"] * group["wd_mult"]


@contextlib.contextmanager
def predictor_frozen_unless(optimizer: Any, active: bool) -> Iterator[None]:
    """Around ``optimizer.step()``: freeze the predictor group unless this step had its loss."""
    groups = [] if active else predictor_groups(optimizer)
    saved = [(group["lr"], group.get("weight_decay", 0.0)) for group in groups]
    for group in groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    try:
        yield
    finally:
        for group, (lr, weight_decay) in zip(groups, saved):
            group["lr"] = lr
            group["weight_decay"] = weight_decay
