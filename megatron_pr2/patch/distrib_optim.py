"""Patch point 5: resuming megatron's distributed optimizer when it runs torch's Adam.

Without Transformer Engine or apex (CPU, or a GPU image without them) megatron-core's
``DistributedOptimizer`` wraps ``torch.optim.Adam``/``AdamW``, which keeps a per-parameter
``step`` tensor in its state (FusedAdam keeps it in the param groups). Three megatron-core
bugs (0.16.1 and 0.19.2 alike) then break every resume from a checkpoint, whatever the model:

1. ``sharded_state_dict(is_loading=True)`` first calls ``state_dict()``, which takes the Adam
   step shared by all params from the per-param state (``assert len(steps) == 1``). A
   just-built optimizer has no state yet, so the assert fails before anything is read.
2. ``load_parameter_state_from_fully_reshardable`` leaves ``step`` out of the tensors it
   hands to ``_set_main_param_and_optimizer_states``, which copies every key of the param's
   state, ``step`` included: ``KeyError: 'step'``.
3. ``load_state_dict`` puts one and the same ``step`` tensor into every param's state; torch
   Adam increments each param's ``step`` in place, so after a resume the shared step advances
   once per param per optimizer step and Adam's bias correction is wrong.

:func:`torch_adam_loading` repairs exactly these, on the optimizer instances it is given and
only for the duration of a load: (1) gives a stateless optimizer the state torch Adam creates
on its first step (step 0, zero moments) through megatron's own ``init_state_fn``, (2) hides
``step`` from the state while the parameter state is copied, (3) gives every param its own
copy of the restored step. Optimizers with FusedAdam (TE/apex) are left alone. The canaries in
``tests/unit/test_patch_points.py`` fail when a megatron-core release no longer has a bug.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

#: The method whose copy trips over ``step`` (bug 2), patched on the instance while loading.
FULLY_RESHARDABLE_LOADER = "load_parameter_state_from_fully_reshardable"


def torch_adam_distributed_optimizers(optimizer: Any) -> list[Any]:
    """The ``DistributedOptimizer`` instances in ``optimizer`` (a ``ChainedOptimizer`` or a
    single one) whose inner optimizer is torch's Adam/AdamW."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    found = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and type(inner.optimizer) in (
            torch.optim.Adam,
            torch.optim.AdamW,
        ):
            if not hasattr(inner, FULLY_RESHARDABLE_LOADER) or not callable(inner.init_state_fn):
                raise RuntimeError(
                    "megatron-core's DistributedOptimizer has no "
                    f"{FULLY_RESHARDABLE_LOADER} / init_state_fn any more: the resume fixes of "
                    "megatron_pr2.patch.distrib_optim miss their target; run "
                    "tests/unit/test_patch_points.py"
                )
            found.append(inner)
    return found


def init_first_step_state(inner: Any) -> bool:
    """Bug 1: the state torch Adam would have before its first update (zero moments via
    megatron's ``init_state_fn``, ``step`` 0) on a stateless optimizer; True if it added it."""
    adam = inner.optimizer
    if len(adam.state) > 0:
        return False
    inner.init_state_fn(adam, inner.config)
    for group in adam.param_groups:
        for param in group["params"]:
            adam.state[param]["step"] = torch.tensor(0.0)
    return True


def _load_without_step(loader: Any, adam: torch.optim.Optimizer) -> Any:
    """Bug 2: run ``loader`` with ``step`` out of the per-param state, then put it back."""

    @functools.wraps(loader)
    def load(*args: Any, **kwargs: Any) -> Any:
        steps = {p: s.pop("step") for p, s in adam.state.items() if "step" in s}
        try:
            return loader(*args, **kwargs)
        finally:
            for param, step in steps.items():
                adam.state[param]["step"] = step

    return load


def unshare_steps(adam: torch.optim.Optimizer) -> None:
    """Bug 3: every param's ``step`` its own tensor (torch Adam increments it in place)."""
    for state in adam.state.values():
        if "step" in state:
            state["step"] = state["step"].detach().clone()


@contextlib.contextmanager
def torch_adam_loading(optimizer: Any) -> Iterator[None]:
    """Around ``sharded_state_dict(is_loading=True)`` and ``load_state_dict`` of a megatron
    optimizer: the three fixes above for its torch-Adam distributed optimizers, undone on
    exit (the instances then use megatron's own methods again)."""
    patched = []
    for inner in torch_adam_distributed_optimizers(optimizer):
        init_first_step_state(inner)
        loader = getattr(inner, FULLY_RESHARDABLE_LOADER)
        setattr(inner, FULLY_RESHARDABLE_LOADER, _load_without_step(loader, inner.optimizer))
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            delattr(inner, FULLY_RESHARDABLE_LOADER)  # the instance attribute: back to the class
            unshare_steps(inner.optimizer)
