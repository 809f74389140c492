"""The README's main job (the replay demo) runs and shows what it claims."""

from megatron_pr2.demo import format_step, run_demo


def test_demo_replays_its_own_routes_then_shows_drift(world1):
    history = run_demo(steps=3, microbatches=2)
    assert len(history) == 3
    assert history[0]["router_replay/zero_deviation_ratio"] == 1.0  # routes just recorded
    assert history[-1]["router_replay/zero_deviation_ratio"] < 1.0  # the router moved
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert "zero_deviation" in format_step(0, history[0])
