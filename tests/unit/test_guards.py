"""Configurations that would silently bypass replay are refused at setup, with a clear error."""

import pytest

from megatron_pr2.config import ReplayMode, RouterReplayConfig
from megatron_pr2.models.gpt import moe_transformer_config
from megatron_pr2.patch.guards import check_replay_compatible

GUARDED = [
    (dict(moe_router_fusion=True), "moe_router_fusion=True: the TE fused top-k returns before"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "'sinkhorn': sinkhorn routing takes its own"),
    (dict(moe_router_force_load_balancing=True), "moe_router_force_load_balancing=True replaces"),
    (dict(num_microbatches_with_partial_activation_checkpoints=2), "recomputes only some"),
    (dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor is set: token dropping"),
]


class FakeConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("options, message", GUARDED)
def test_each_bypass_is_refused_with_its_reason(options, message):
    with pytest.raises(ValueError, match="routing replay cannot be enabled") as err:
        check_replay_compatible(FakeConfig(**options))
    assert message in str(err.value)


def test_quantile_balancing_and_force_biased_are_refused():
    with pytest.raises(ValueError, match="'quantile_balancing': quantile-balancing"):
        check_replay_compatible(FakeConfig(moe_router_load_balancing_type="quantile_balancing"))
    with pytest.raises(ValueError, match="moe_router_force_biased adds a random bias"):
        check_replay_compatible(FakeConfig(moe_router_force_biased=0.5))


def test_sinkhorn_inside_a_list_of_routing_types_is_refused():
    with pytest.raises(ValueError, match="sinkhorn"):
        check_replay_compatible(FakeConfig(moe_router_load_balancing_type=["aux_loss", "sinkhorn"]))


def test_token_dropping_allowed_when_asked():
    check_replay_compatible(
        FakeConfig(moe_expert_capacity_factor=1.0), RouterReplayConfig(allow_token_dropping=True)
    )


def test_supported_config_passes(world1):
    check_replay_compatible(moe_transformer_config())


def test_router_construction_runs_the_guards(world1):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_pr2.patch import ReplayTopKRouter

    config = moe_transformer_config(moe_router_load_balancing_type="sinkhorn")
    with pytest.raises(ValueError, match="sinkhorn"):
        ReplayTopKRouter(config, pg_collection=get_default_pg_collection())


def test_mode_parsing_accepts_aliases_and_rejects_unknown():
    assert RouterReplayConfig(mode="R2").mode is ReplayMode.R2
    assert RouterReplayConfig(mode="disabled").mode is ReplayMode.NONE
    with pytest.raises(ValueError, match="unknown mode 'r4'"):
        RouterReplayConfig(mode="r4")
