"""Patch point 1: the MoE router, a ``TopKRouter`` subclass built through the model spec.

megatron-core's ``topk_routing_with_score_function`` asks ``router.router_replay`` for every
top-k it takes (the native ``RouterReplay`` hook). The subclass installs a
:class:`~megatron_pr2.replay.state.RouterReplayState` there instead of the native object, so
megatron's own score/gate math runs unchanged on the replayed expert set. No megatron source is
edited at run time.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.patch.guards import check_replay_compatible
from megatron_pr2.patch.version import check_megatron_core_version
from megatron_pr2.replay.state import RouterReplayState


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
        self.replay_config = replay_config or RouterReplayConfig()
        check_replay_compatible(config, self.replay_config)
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        native = self.router_replay
        if native is not None:  # moe_enable_routing_replay=True also built a native one: unhook it
            RouterReplay.global_router_replay_instances[:] = [
                r for r in RouterReplay.global_router_replay_instances if r is not native
            ]
        self.router_replay = RouterReplayState(
            num_experts=config.num_moe_experts,
            topk=config.moe_router_topk,
            collect_metrics=self.replay_config.collect_metrics,
        )

    @property
    def replay_state(self) -> RouterReplayState:
        return self.router_replay

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self.router_replay.layer_number = layer_number
