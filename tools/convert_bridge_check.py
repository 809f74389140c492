"""Cross-check ``pr2 convert`` against Megatron-Bridge on Qwen3-MoE (the one architecture the
bridge converts on a CPU stack): both must produce the same megatron-core tensors.

Runs in its own venv (megatron-bridge 0.6.2 needs megatron-core 0.19.2 and transformers 5.12),
see ``.ci/run``::

    PYTHONPATH=. .venv-bridge/bin/python tools/convert_bridge_check.py

The bridge is imported with a small prelude: ``typing.override`` for Python 3.11 (the
megatron-core 0.19.2 wheel ships ``megatron/training``, which uses it), and a throwaway
Transformer Engine stand-in that exists only while the bridge's two PEFT modules that import
TE unguarded execute (a global one would make megatron-core believe TE is installed). The
bridge model uses its local (non-TE) spec, fp32, fusions off, on the project's CPU shim.
Exit status 0: every tensor equal; 1: a mismatch (named); 3: the bridge cannot be imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TE_USERS = ("megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora")


def _te_standin() -> dict[str, types.ModuleType]:
    import torch

    class _AnyAttr(type):
        """A class whose every (non-dunder) attribute is another such class (``te.ops.X``)."""

        def __getattr__(cls, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _AnyAttr(name, (torch.nn.Module,), {})

    def anything(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttr(name, (torch.nn.Module,), {})

    modules = {}
    for name in ("transformer_engine", "transformer_engine.pytorch"):
        module = types.ModuleType(name)
        module.__getattr__ = anything  # type: ignore[method-assign]
        modules[name] = module
    modules["transformer_engine"].pytorch = modules["transformer_engine.pytorch"]
    return modules


class _ScopedTE(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the TE-importing PEFT modules: the stand-in is in ``sys.modules``
    only while they execute."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TE_USERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            standin = _te_standin()
            saved = {n: sys.modules.get(n) for n in standin}
            sys.modules.update(standin)
            try:
                real_exec(module)
            finally:
                for name, previous in saved.items():
                    if previous is None:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = previous

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def import_bridge():
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    sys.meta_path.insert(0, _ScopedTE())
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec

    return AutoBridge, local_layer_spec


def cpu_provider(hf_dir: Path, AutoBridge, layer_spec, **overrides):
    """The bridge's provider for ``hf_dir`` with its weights, made CPU-safe (``layer_spec``,
    fp32, fusions off, world 1) and finalized, with megatron's parallel state set up by it.
    ``overrides``: further provider fields (e.g. recompute) set before ``finalize``."""
    import torch

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir), torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.transformer_layer_spec = layer_spec
    provider.params_dtype = torch.float32
    provider.bf16 = False
    provider.pipeline_dtype = torch.float32
    for flag in (
        "moe_grouped_gemm",
        "moe_permute_fusion",
        "moe_router_fusion",
        "gradient_accumulation_fusion",
        "apply_rope_fusion",
        "bias_dropout_fusion",
        "persist_layer_norm",
        "masked_softmax_fusion",
        # Same loss, but gradients ~1e-3 (relative) off the unfused path's on CPU (0.19.2).
        "cross_entropy_loss_fusion",
    ):
        setattr(provider, flag, False)
    provider.tensor_model_parallel_size = 1
    provider.expert_model_parallel_size = 1
    for name, value in overrides.items():
        setattr(provider, name, value)
    provider.finalize()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the bridge sets up its own
    provider.initialize_model_parallel(seed=0)
    return provider


def bridge_tensors(hf_dir: Path, AutoBridge, local_layer_spec) -> dict:
    provider = cpu_provider(hf_dir, AutoBridge, local_layer_spec)
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> int:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from tests.support.dist import free_port, init_process

    init_process(0, 1, free_port())  # CPU shim (triton stand-in for 0.19) + gloo world 1
    try:
        AutoBridge, local_layer_spec = import_bridge()
    except Exception as exc:  # the check cannot run here: say so loudly, distinctly
        print(f"SKIPPED: cannot import megatron.bridge: {type(exc).__name__}: {exc}")
        return 3

    import torch

    from megatron_pr2.convert import hf_to_mcore, load_chunks, load_converted_model_description
    from tests.support.hf_models import build_hf_model, save

    work = Path(tempfile.mkdtemp(prefix="bridge_check_"))
    save(build_hf_model("qwen3_moe", seed=2), work / "hf")
    ours_dir = work / "ours"
    hf_to_mcore(work / "hf", ours_dir, show_progress=False)
    (chunk,) = load_chunks(ours_dir, load_converted_model_description(ours_dir))
    ours = {n: p.detach() for n, p in chunk.named_parameters() if "evolution_predictor" not in n}
    theirs = bridge_tensors(work / "hf", AutoBridge, local_layer_spec)

    shutil.rmtree(work, ignore_errors=True)
    problems = [f"only in pr2 convert: {n}" for n in sorted(set(ours) - set(theirs))]
    problems += [f"only in Megatron-Bridge: {n}" for n in sorted(set(theirs) - set(ours))]
    for name in sorted(set(ours) & set(theirs)):
        if ours[name].shape != theirs[name].shape:
            problems.append(f"{name}: shape {list(ours[name].shape)} vs {list(theirs[name].shape)}")
        elif not torch.equal(ours[name], theirs[name]):
            diff = (ours[name] - theirs[name]).abs().max().item()
            problems.append(f"{name}: values differ (max |diff| {diff})")
    if problems:
        print("MISMATCH between pr2 convert and Megatron-Bridge:\n  " + "\n  ".join(problems))
        return 1
    print(f"OK: {len(ours)} megatron tensors identical to Megatron-Bridge's (Qwen3-MoE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
