"""The launcher itself: a failing rank fails the test, with that rank's traceback."""

import pytest


def _fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


@pytest.mark.slow
def test_a_failing_rank_fails_the_test_with_its_traceback(run_dist):
    with pytest.raises(AssertionError, match=r"(?s)rank 1.*boom on rank one"):
        run_dist(_fail_on_rank_one, 2)
