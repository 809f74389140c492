"""Patch point 1: the MoE router, a ``TopKRouter`` subclass built through the model spec.

megatron-core's ``topk_routing_with_score_function`` asks ``router.router_replay`` for every
top-k it takes (the native ``RouterReplay`` hook). The subclass installs a
:class:`~megatron_pr2.patch.native.CompatRouterReplay` there instead of the native object: a
:class:`~megatron_pr2.replay.state.RouterReplayState` (driven by ``ReplaySession``) that is also a
megatron ``RouterReplay`` (driven by megatron's static API), so megatron's own score/gate math
runs unchanged on the replayed expert set. No megatron source is edited at run time.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch.compat import apply_compat_fixes
from megatron_pr2.patch.guards import check_replay_compatible
from megatron_pr2.patch.native import CompatRouterReplay
from megatron_pr2.patch.version import check_megatron_core_version
from megatron_pr2.predictor.module import EvolutionPredictor
from megatron_pr2.predictor.state import PredictorState
from megatron_pr2.replay.state import RouteAction, RouterReplayState, in_backward_recompute


class _TopkChosen(Exception):
    """Stops megatron's routing function once its top-k is chosen (the probabilities and the
    routing map it would build next are not needed for a predicted route)."""

    def __init__(self, indices: torch.Tensor) -> None:
        super().__init__("top-k chosen")
        self.indices = indices


class _TopkCapture:
    """A replay hook that hands back the top-k megatron computes and ends the routing call."""

    def get_replay_topk(self, scores, topk, num_groups, group_topk, default_compute_topk):
        _, indices = default_compute_topk(
            scores, topk, num_groups=num_groups, group_topk=group_topk
        )
        raise _TopkChosen(indices)


class ReplayTopKRouter(TopKRouter):
    """``TopKRouter`` whose top-k can be recorded or replayed per microbatch."""

    def __init__(
        self,
        config: Any,
        pg_collection: Any = None,
        replay_config: RouterReplayConfig | None = None,
        **kwargs: Any,
    ) -> None:
        check_megatron_core_version()
        apply_compat_fixes()
        self.replay_config = replay_config or RouterReplayConfig()
        check_replay_compatible(config, self.replay_config)
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        native = self.router_replay
        if native is not None:  # moe_enable_routing_replay=True also built a native one: unhook it
            RouterReplay.global_router_replay_instances[:] = [
                r for r in RouterReplay.global_router_replay_instances if r is not native
            ]
        # Our state, also a megatron RouterReplay: native API callers drive the same object.
        self.router_replay = CompatRouterReplay(
            num_experts=config.num_moe_experts,
            topk=config.moe_router_topk,
            collect_metrics=self.replay_config.collect_metrics,
            metrics_token_stride=self.replay_config.metrics_token_stride,
            device_of=self.weight,
        )
        # Softmax after top-k, no expert groups: megatron's routing takes ``torch.topk`` of the
        # raw logits (moe_utils.topk_routing_with_score_function), so the predicted route can
        # too, without entering the routing function (canary: tests/unit/test_patch_points.py).
        self._selects_on_raw_logits = (
            self.score_function == "softmax"
            and not config.moe_router_pre_softmax
            and not config.moe_router_group_topk
        )
        self.evolution_predictor: EvolutionPredictor | None = None
        if self.replay_config.uses_predictor:
            self.evolution_predictor = EvolutionPredictor(
                config.hidden_size, config.num_moe_experts, config.sequence_parallel
            )
            self.router_replay.predictor = PredictorState(
                self.replay_config.predictor, config.moe_router_topk
            )

    @property
    def replay_state(self) -> RouterReplayState:
        return self.router_replay

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self.router_replay.layer_number = layer_number

    # ------------------------------------------------------------------ PR2
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if self.evolution_predictor is None or self.router_replay.action is RouteAction.LIVE:
            return logits
        state = self.router_replay
        # RECORD (pr2) picks predicted routes and caches features; a REPLAY pass with
        # cache_features (pr2_r3's old-log-prob pass) only caches them.
        recording = not in_backward_recompute() and (
            state.action is RouteAction.RECORD
            or (state.action is RouteAction.REPLAY and state.predictor.cache_features)
        )
        # The loss runs once per microbatch: in the forward, or (when checkpointed, since megatron
        # runs the first forward under no_grad) in the recompute; like megatron's aux losses.
        training = (
            not recording
            and state.action is RouteAction.REPLAY
            and state.predictor.compute_loss
            and torch.is_grad_enabled()
        )
        if not (recording or training):
            return logits
        flat_input = input.flatten(0, -2)  # [tokens, hidden]
        flat_logits = logits.flatten(0, -2)  # [tokens, experts]
        microbatch = state.microbatch_of_current_call()
        keys = state.microbatch_keys(microbatch, flat_logits.shape[0], flat_logits.device)
        if recording:
            offset = state.predictor.record(self.evolution_predictor, flat_input, flat_logits, keys)
            if state.action is RouteAction.REPLAY:
                return logits
            if self.replay_config.predictor.bias_in_gate_weights:
                return (logits + offset.view_as(logits)).to(logits.dtype)
            state.stage_indices(self.predicted_topk(flat_logits.detach() + offset))
        else:
            token_group = self.tp_cp_group if self.config.sequence_parallel else self.cp_group
            state.set_pending_loss(
                state.predictor.loss(self.evolution_predictor, flat_logits, keys, token_group)
            )
        return logits

    @torch.no_grad()
    def predicted_topk(self, biased_logits: torch.Tensor) -> torch.Tensor:
        """megatron's own selection (score function, expert bias, groups) on biased logits."""
        if self._selects_on_raw_logits:
            return torch.topk(biased_logits, self.topk, dim=1).indices
        return self._megatron_topk(biased_logits)

    @torch.no_grad()
    def _megatron_topk(self, biased_logits: torch.Tensor) -> torch.Tensor:
        """The top-k megatron's routing function takes on these logits, whatever its config."""
        config = self.config
        try:
            topk_routing_with_score_function(
                biased_logits,
                self.topk,
                use_pre_softmax=config.moe_router_pre_softmax,
                num_groups=config.moe_router_num_groups,
                group_topk=config.moe_router_group_topk,
                scaling_factor=config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                router_replay=_TopkCapture(),
            )
        except _TopkChosen as chosen:
            return chosen.indices
        raise RuntimeError(
            f"layer {self.layer_number}: megatron's routing never called the replay hook; "
            "run tests/unit/test_patch_points.py"
        )

    def routing(self, logits: torch.Tensor, *args: Any, **kwargs: Any):
        probs, routing_map = super().routing(logits, *args, **kwargs)
        loss = self.router_replay.take_pending_loss()
        if loss is not None:  # megatron's side-loss plumbing: scaled like the MoE aux losses
            probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs, routing_map
