"""Canaries: one per megatron-core patch point. Each fails loudly when an upstream change makes
the patch miss its target (renamed hook, changed signature, new spec shape)."""

import dataclasses
import functools
import inspect
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import moe_transformer_config
from megatron_pr2.patch import ReplayTopKRouter, megatron_core_version, with_replay_router
from megatron_pr2.patch.version import TESTED_VERSIONS


def test_installed_version_is_a_tested_one():
    assert megatron_core_version() in TESTED_VERSIONS


class RecordingHook:
    def __init__(self):
        self.calls = []

    def get_replay_topk(self, scores, topk, num_groups, group_topk, default_compute_topk):
        self.calls.append(scores.shape)
        return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)


def test_topk_routing_calls_the_router_replay_hook_for_every_score_function():
    """Patch point 1 relies on topk_routing_with_score_function(..., router_replay=obj)."""
    from megatron.core.transformer.moe import moe_utils

    assert (
        "router_replay" in inspect.signature(moe_utils.topk_routing_with_score_function).parameters
    )
    for kwargs in (
        dict(score_function="softmax"),
        dict(score_function="softmax", use_pre_softmax=True),
        dict(score_function="sigmoid"),
        dict(score_function="sigmoid", expert_bias=torch.zeros(4)),
        dict(score_function="sigmoid", num_groups=2, group_topk=1),
    ):
        hook = RecordingHook()
        moe_utils.topk_routing_with_score_function(
            torch.randn(3, 4), 2, router_replay=hook, **kwargs
        )
        assert hook.calls == [torch.Size([3, 4])], kwargs


def test_topk_router_routes_through_self_router_replay():
    from megatron.core.transformer.moe.router import TopKRouter

    assert "router_replay=self.router_replay" in inspect.getsource(TopKRouter.routing)
    assert issubclass(ReplayTopKRouter, TopKRouter)


def test_moe_submodules_has_a_router_builder_field():
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    assert "router" in {f.name for f in dataclasses.fields(MoESubmodules)}


def test_recompute_detection_hook_exists_and_flips_inside_backward():
    assert torch._C._current_graph_task_id() == -1
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(torch._C._current_graph_task_id())
            return g

    Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen and seen[0] != -1


def test_decoder_block_spec_rewrite_reaches_every_moe_layer(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = moe_transformer_config()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    rewritten = with_replay_router(spec, RouterReplayConfig(mode="r2"))
    for original, layer in zip(spec.layer_specs, rewritten.layer_specs):
        mlp = layer.submodules.mlp
        submodules = (
            mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
        )
        assert isinstance(submodules.router, functools.partial)
        assert submodules.router.func is ReplayTopKRouter
        original_mlp = original.submodules.mlp
        original_sub = (
            original_mlp.keywords["submodules"]
            if isinstance(original_mlp, functools.partial)
            else original_mlp.submodules
        )
        assert original_sub.router is not ReplayTopKRouter  # the input spec is untouched


def test_dense_spec_is_refused(world1):
    import pytest
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    with pytest.raises(ValueError, match="no MoE layer found"):
        with_replay_router(get_gpt_layer_local_spec())


def test_compat_binds_te_general_gemm_only_where_megatron_left_it_unbound(monkeypatch):
    """Patch point 4: 0.16.x never binds ``moe_utils.te_general_gemm`` without TE (0.19 binds
    None). The fix must bind exactly that name, to None, and touch nothing already bound."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_pr2.patch.compat import TE_GENERAL_GEMM_FIXED_IN, bind_missing_te_general_gemm

    assert "te_general_gemm" in inspect.getsource(moe_utils.RouterGatingLinearFunction.forward)
    sentinel = object()
    monkeypatch.setattr(moe_utils, "te_general_gemm", sentinel, raising=False)
    assert bind_missing_te_general_gemm() is False
    assert moe_utils.te_general_gemm is sentinel
    monkeypatch.delattr(moe_utils, "te_general_gemm")
    if megatron_core_version() < TE_GENERAL_GEMM_FIXED_IN:
        assert bind_missing_te_general_gemm() is True
        assert moe_utils.te_general_gemm is None
    else:  # a regression upstream is reported, not papered over
        with pytest.raises(RuntimeError, match="te_general_gemm is unbound"):
            bind_missing_te_general_gemm()


def test_megatron_leaves_te_general_gemm_unbound_exactly_before_the_fixed_version(tmp_path):
    """Pins the bug's version range in a fresh interpreter (no shim, no fix applied): if a
    supported version stops leaving the name unbound, the fix's version guard is wrong."""
    import importlib.util
    import subprocess
    import sys

    from megatron_pr2.patch.compat import TE_GENERAL_GEMM_FIXED_IN

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("with Transformer Engine installed the name is always bound")
    # Only the shim's import-time stand-in (0.19 imports triton unguarded), none of its fixes:
    # the file is loaded on its own, since importing the ``tests`` package installs the shim.
    shim = Path(__file__).resolve().parents[1] / "support" / "cpu_shim.py"
    probe = (
        "import importlib.util as u; "
        f"spec = u.spec_from_file_location('shim_probe', {str(shim)!r}); "
        "shim = u.module_from_spec(spec); spec.loader.exec_module(shim); "
        "shim._stand_in_paged_stash_ops(); "
        "import megatron.core.transformer.moe.moe_utils as m; "
        "print(hasattr(m, 'te_general_gemm'))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.split()[-1]
    assert out == str(megatron_core_version() >= TE_GENERAL_GEMM_FIXED_IN)


# ---------------------------------------------------------------- patch point 3: dispatcher
def test_planned_dispatch_spec_builds_replay_moe_layers_with_both_patches(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_pr2.patch.dispatcher import ReplayMoELayer
    from megatron_pr2.patch.spec import with_planned_dispatch

    config = moe_transformer_config()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    rewritten = with_planned_dispatch(with_replay_router(spec, RouterReplayConfig(mode="r2")))
    for layer in rewritten.layer_specs:
        mlp = layer.submodules.mlp
        module = mlp.func if isinstance(mlp, functools.partial) else mlp.module
        submodules = (
            mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
        )
        assert module is ReplayMoELayer
        assert submodules.router.func is ReplayTopKRouter  # the router patch survives


def test_alltoall_preprocess_sets_what_the_planned_dispatcher_sets(world1):
    """Patch point 3 replaces ``MoEAlltoAllTokenDispatcher.preprocess``: megatron's version must
    still set exactly the attributes the plan sets, and the two must agree on a routing map."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_pr2.patch.dispatcher import PREPROCESS_ATTRIBUTES
    from megatron_pr2.replay.dispatch_plan import DispatchSlot
    from megatron_pr2.routes.dispatch_counts import DispatchTopology, derive_splits, route_counts

    source = inspect.getsource(td.MoEAlltoAllTokenDispatcher.preprocess)
    for name in PREPROCESS_ATTRIBUTES:
        if name != "cuda_sync_point":
            assert f"self.{name} =" in source, name
    assert "gather_from_sequence_parallel_region" in source
    assert "_maybe_dtoh_and_synchronize" in inspect.getsource(td.MoEAlltoAllTokenDispatcher)
    assert "padding_mask" in inspect.signature(MoELayer.route).parameters

    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    dispatcher = td.MoEAlltoAllTokenDispatcher(
        8, list(range(8)), config=moe_transformer_config(), pg_collection=pg_collection
    )
    routes = torch.rand(20, 8).argsort(dim=1)[:, :2]
    routing_map = torch.zeros(20, 8, dtype=torch.bool).scatter(1, routes, True)
    expected = dispatcher.preprocess(routing_map)
    topo = DispatchTopology(8, 2, 1, 1, 0, 0, 8, 0)
    splits = derive_splits(route_counts([routes], 8, [False]).numpy()[None], [20], topo)
    sizes = DispatchSlot(1, splits)._decide(0, 20, True, False)
    assert expected.tolist() == sizes.tokens_per_local_expert.tolist()
    assert dispatcher.num_global_tokens_per_local_expert.tolist() == (
        sizes.global_tokens_per_local_expert.tolist()
    )
    assert dispatcher.num_out_tokens == 40


def test_allgather_postprocess_is_what_the_planned_dispatcher_restates(world1):
    """Patch point 3b restates ``MoEAllGatherTokenDispatcher.dispatch_postprocess`` around
    megatron's ``permute`` with the tokens per expert from the plan: megatron's method must
    still be made of the pinned statements, and both must give the same results."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import token_dispatcher as td

    from megatron_pr2.patch.dispatcher import (
        ALLGATHER_POSTPROCESS_STATEMENTS,
        PlannedAllGatherTokenDispatcher,
    )
    from megatron_pr2.replay.dispatch_plan import DispatchSlot
    from megatron_pr2.routes.dispatch_counts import DispatchTopology, derive_splits, route_counts

    source = inspect.getsource(td.MoEAllGatherTokenDispatcher.dispatch_postprocess)
    for statement in ALLGATHER_POSTPROCESS_STATEMENTS:
        assert statement in source, statement
    assert source.count(".cpu()") == 1  # the one host read the plan replaces
    assert "permute(" in source and "self.reversed_local_input_permutation_mapping" in source

    config = moe_transformer_config(moe_token_dispatcher_type="allgather")
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    routes = torch.rand(20, 8).argsort(dim=1)[:, :2]
    routing_map = torch.zeros(20, 8, dtype=torch.bool).scatter(1, routes, True)
    probs = torch.rand(20, 8) * routing_map
    hidden = torch.randn(20, 1, 32)
    topo = DispatchTopology(8, 2, 1, 1, 0, 0, 8, 0)
    splits = derive_splits(route_counts([routes], 8, [False]).numpy()[None], [20], topo)
    results = []
    for planned in (False, True):
        dispatcher = td.MoEAllGatherTokenDispatcher(
            8, list(range(8)), config=config, pg_collection=pg_collection
        )
        if planned:
            dispatcher.__class__ = PlannedAllGatherTokenDispatcher
            dispatcher._init_plan_state(None)
            dispatcher.dispatch_slot = DispatchSlot(1, splits)
            dispatcher._router_replays = lambda: True
        tokens, p = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
        tokens, p = dispatcher.token_dispatch(tokens, p)
        out = dispatcher.dispatch_postprocess(tokens, p)
        results.append((out, dispatcher.reversed_local_input_permutation_mapping))
        if planned:
            assert dispatcher.plan_stats == {"planned": 1}
    (ref, ref_map), (got, got_map) = results
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert torch.equal(ref_map, got_map)


def test_alltoall_drop_and_pad_is_per_call_state_the_padded_plan_can_set():
    """The padded planned dispatch sets ``drop_and_pad`` / ``capacity`` (and the attributes of
    megatron's drop-and-pad ``preprocess``) per call: every later step must read them from the
    instance, and the drop-and-pad branch must set no other attribute."""
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    for method in ("dispatch_preprocess", "dispatch_postprocess", "combine_preprocess"):
        assert "self.drop_and_pad" in inspect.getsource(getattr(cls, method)), method
    assert "if not self.drop_and_pad" in inspect.getsource(cls._maybe_dtoh_and_synchronize)
    source = inspect.getsource(cls.preprocess)
    branch = source[source.index("if self.drop_and_pad:") : source.index("return num_tokens")]
    assigned = {line.split("=")[0].strip() for line in branch.splitlines() if " = " in line}
    assert {a for a in assigned if a.startswith("self.")} == {
        "self.capacity",
        "self.num_out_tokens",
        "self.num_global_tokens_per_local_expert",
    }
    assert "self.capacity," in inspect.getsource(cls.dispatch_postprocess)  # the view sizes


# ---------------------------------------------------------------- patch point 1b: native API
#: megatron's RouterReplay API that CompatRouterReplay serves, per version: a new or renamed
#: method or field fails here before it can bypass our state.
_NATIVE_METHODS = {
    "set_replay_data",
    "get_recorded_data",
    "clear_global_indices",
    "set_global_router_replay_action",
    "clear_global_router_replay_action",
    "clear_global_router_replay_instances",
    "set_target_indices",
    "get_recorded_indices",
    "record_indices",
    "clear_indices",
    "set_router_replay_action",
    "clear_router_replay_action",
    "get_replay_topk",
}
_NATIVE_FIELDS = {
    "target_topk_idx",
    "recorded_topk_idx",
    "router_replay_action",
    "replay_backward_list",
}
#: 0.19 adds CUDA-graph static buffers (inherited unchanged: they only hold a tensor) and the
#: layer number (set by Router.set_layer_number).
_NATIVE_METHODS_0_19 = {
    "set_global_static_buffers",
    "clear_global_static_buffers",
    "set_static_buffer",
    "clear_static_buffer",
}
_NATIVE_FIELDS_0_19 = {"static_buffer", "layer_number"}


def test_native_router_replay_api_is_the_one_compat_router_replay_serves():
    import re

    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2.patch.native import CompatRouterReplay

    new = megatron_core_version() >= Version("0.19")
    methods = _NATIVE_METHODS | (_NATIVE_METHODS_0_19 if new else set())
    fields = _NATIVE_FIELDS | (_NATIVE_FIELDS_0_19 if new else set())
    public = {
        name
        for name, value in vars(RouterReplay).items()
        if not name.startswith("_") and callable(getattr(RouterReplay, name))
    }
    assert public == methods
    assigned = set(re.findall(r"self\.(\w+)\s*[:=]", inspect.getsource(RouterReplay.__init__)))
    assert assigned == fields
    assert {a.name for a in RouterReplayAction} == {"RECORD", "REPLAY_FORWARD", "REPLAY_BACKWARD"}
    assert isinstance(vars(RouterReplay)["global_router_replay_instances"], list)  # class-level
    # Every instance method and field that reads or writes routes is ours (static methods only
    # walk the instance list; the 0.19 buffer and its setters only hold a tensor, which
    # get_recorded_indices reads).
    for name in (methods - _NATIVE_METHODS_0_19) | (fields - {"static_buffer"}):
        if isinstance(vars(RouterReplay).get(name), staticmethod):
            continue
        owner = next(c for c in CompatRouterReplay.__mro__ if name in vars(c))
        assert owner is not RouterReplay, name


def test_router_set_layer_number_reaches_router_replay_from_0_19():
    """0.19's Router.set_layer_number also sets router_replay.layer_number (ours is a property
    both versions reach through ReplayTopKRouter.set_layer_number)."""
    from megatron.core.transformer.moe.router import Router

    source = inspect.getsource(Router.set_layer_number)
    assert ("router_replay.layer_number" in source) == (megatron_core_version() >= Version("0.19"))


# Patch point 5 (megatron_pr2.patch.distrib_optim): torch Adam in the distributed optimizer.
def _torch_adam_distributed(seed: int = 5):
    from megatron_pr2.models.training import setup_training
    from tests.unit.test_predictor import build

    chunks, _ = build("pr2", seed=seed)
    setup = setup_training(chunks, lr=1e-3, predictor_lr_mult=10.0, use_distributed_optimizer=True)
    inner = setup.optimizer.chained_optimizers[0]
    assert type(inner).__name__ == "DistributedOptimizer"
    assert type(inner.optimizer) in (torch.optim.Adam, torch.optim.AdamW)  # no TE/apex here
    return setup, inner


def _stepped_checkpoint(path: Path) -> None:
    from megatron_pr2.models.training import save_checkpoint, train_step
    from tests.support import replay_harness as h

    setup, _ = _torch_adam_distributed()
    train_step(setup, h.make_batches(1), predictor_active=True)
    save_checkpoint(setup, path)


def test_distrib_optim_fresh_torch_adam_state_dict_still_asserts_one_step(world1):
    """Bug 1: a just-built optimizer's ``state_dict`` (called by ``sharded_state_dict`` when
    loading) asserts one Adam step over no state; the fix gives it step 0."""
    from megatron_pr2.patch import distrib_optim

    _, inner = _torch_adam_distributed()
    assert distrib_optim.torch_adam_distributed_optimizers(inner) == [inner]
    with pytest.raises(AssertionError):
        inner.state_dict()
    assert distrib_optim.init_first_step_state(inner) is True
    groups = inner.state_dict()["optimizer"]["param_groups"]
    assert {g["step"] for g in groups} == {0.0}
    assert distrib_optim.init_first_step_state(inner) is False  # never twice


def test_distrib_optim_fully_reshardable_loader_still_trips_over_step(
    world1, tmp_path, monkeypatch
):
    """Bug 2: the loader copies every state key but hands over no ``step``; the fix hides
    ``step`` for the copy. Bug 3: ``load_state_dict`` shares one ``step`` tensor among all
    params; the fix gives each its own."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_pr2.models.training import load_checkpoint
    from megatron_pr2.patch import distrib_optim

    assert callable(getattr(DistributedOptimizer, distrib_optim.FULLY_RESHARDABLE_LOADER))
    _stepped_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(distrib_optim, "_load_without_step", lambda loader, adam: loader)
    setup, _ = _torch_adam_distributed(seed=7)
    with pytest.raises(KeyError, match="step"):
        load_checkpoint(setup, tmp_path / "ckpt")
    monkeypatch.undo()

    monkeypatch.setattr(distrib_optim, "unshare_steps", lambda adam: None)
    setup, inner = _torch_adam_distributed(seed=7)
    load_checkpoint(setup, tmp_path / "ckpt")
    steps = [state["step"] for state in inner.optimizer.state.values()]
    assert len(steps) > 1 and len({id(step) for step in steps}) == 1  # one shared tensor
    monkeypatch.undo()

    setup, inner = _torch_adam_distributed(seed=7)
    load_checkpoint(setup, tmp_path / "ckpt")
    steps = [state["step"] for state in inner.optimizer.state.values()]
    assert len({id(step) for step in steps}) == len(steps) and {float(s) for s in steps} == {1.0}
    assert distrib_optim.FULLY_RESHARDABLE_LOADER not in vars(inner)  # instance patch undone


# Patch point 6 (megatron_pr2.patch.float16_optim): the bf16 optimizer with fp32 params.
def test_float16_optim_still_misnumbers_fp32_params_in_its_sharded_state_dict(world1):
    """megatron's bf16 optimizer numbers its state by ``float16_groups`` alone, so a model
    with fp32 params (CPU norms, the predictor) cannot be saved; the fix's view numbers every
    param in torch's order, puts the predictor's Adam state under its model key, and is undone
    on exit."""
    from megatron_pr2.models.training import _flat, _model_sharded_state_dict, train_step
    from megatron_pr2.patch import float16_optim
    from tests.support import replay_harness as h
    from tests.unit.test_distopt_resume import build_bf16, setup_bf16

    chunks, _ = build_bf16("pr2", seed=5)
    setup = setup_bf16(chunks, use_distributed=False)
    train_step(setup, h.make_batches(1), predictor_active=True)
    [inner] = float16_optim.float16_optimizers_with_fp32_params(setup.optimizer)
    assert type(inner).__name__ == "Float16OptimizerWithFloat16Params"
    model = _flat(_model_sharded_state_dict(setup))
    with pytest.raises(ValueError, match="does not match any model sharded param"):
        inner.sharded_state_dict(model)
    float16, main = inner.float16_groups, inner.fp32_from_float16_groups
    with float16_optim.fp32_params_as_main_params(setup.optimizer):
        state = inner.sharded_state_dict(model)
    assert inner.float16_groups is float16 and inner.fp32_from_float16_groups is main
    per_param = [v for v in state["optimizer"]["state"].values() if isinstance(v, dict)]
    keys = [t.key for param in per_param for t in param.values()]  # (and one common_step)
    predictor = [k for k in keys if "evolution_predictor" in k]  # (layers share a key)
    assert len(predictor) == 2 * h.SHAPE.num_layers  # exp_avg and exp_avg_sq of each layer's
