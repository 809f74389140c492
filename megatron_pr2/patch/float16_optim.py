"""Patch point 6: checkpoints of megatron's bf16 optimizer when the model also has fp32 params.

``Float16OptimizerWithFloat16Params`` (bf16 without the distributed optimizer) keeps an fp32
main copy of each bf16 param and steps fp32 params in place. Its ``sharded_state_dict``
(megatron-core 0.16.1 and 0.19.2) numbers the optimizer's params by walking
``float16_groups`` only, while torch numbers its state by walking every param of every group,
and it pairs ``fp32_from_float16_groups`` with all of a group's param ids. With any fp32 param
in the model the numbering is off and the save fails (``Param id N does not match any model
sharded param``) or would pair state with the wrong tensor. On GPU with TE every param is bf16;
here megatron's torch-norm fallback keeps norm scales in fp32, and the PR2 predictor is fp32 by
design (like megatron's router in ``moe_router_dtype='fp32'``), so every bf16 checkpoint failed.

:func:`fp32_params_as_main_params`, around ``sharded_state_dict`` (save and load) and
``load_state_dict``, presents each group in the optimizer's own order: ``float16_groups`` holds
the model param of every optimizer param (the bf16 one, or the fp32 param itself) and
``fp32_from_float16_groups`` every optimizer param (the fp32 main copy, or the fp32 param
itself). The numbering is then torch's, and the fp32 params are saved like main params (an
extra ``optimizer.state.fp32_param`` copy of them). Optimizers without fp32 params are left
alone, so their checkpoints keep megatron's layout; the canary is in
``tests/unit/test_patch_points.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def float16_optimizers_with_fp32_params(optimizer: Any) -> list[Any]:
    """The ``Float16OptimizerWithFloat16Params`` instances in ``optimizer`` (chained or single)
    that hold fp32 params as well."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    return [
        inner
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(inner, Float16OptimizerWithFloat16Params) and any(inner.fp32_from_fp32_groups)
    ]


def _groups_in_optimizer_order(inner: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    """(model param, optimizer param) of every param, group by group, in torch's order."""
    model_groups, main_groups = [], []
    for group, float16, main in zip(
        inner.optimizer.param_groups, inner.float16_groups, inner.fp32_from_float16_groups
    ):
        model_of = {id(copy): param for param, copy in zip(float16, main)}
        model_groups.append([model_of.get(id(p), p) for p in group["params"]])
        main_groups.append(list(group["params"]))
    return model_groups, main_groups


@contextlib.contextmanager
def fp32_params_as_main_params(optimizer: Any) -> Iterator[None]:
    """The view described above on every bf16 optimizer with fp32 params, undone on exit."""
    saved = []
    for inner in float16_optimizers_with_fp32_params(optimizer):
        saved.append((inner, inner.float16_groups, inner.fp32_from_float16_groups))
        inner.float16_groups, inner.fp32_from_float16_groups = _groups_in_optimizer_order(inner)
    try:
        yield
    finally:
        for inner, float16, main in saved:
            inner.float16_groups, inner.fp32_from_float16_groups = float16, main
