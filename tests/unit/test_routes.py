"""The route input contract: every malformed route is a ValueError naming layer and token."""

import pytest
import torch

from megatron_pr2.replay.routes import validate_routes


def check(routes, **kw):
    args = dict(layer=3, num_experts=8, topk=2)
    args.update(kw)
    return validate_routes(routes, **args)


def test_valid_routes_pass_and_become_int64():
    routes = torch.tensor([[0, 7], [3, 1], [-1, -1]], dtype=torch.int16)
    out = check(routes, num_tokens=3)
    assert out.dtype == torch.int64
    assert torch.equal(out, routes.long())


@pytest.mark.parametrize(
    "routes, message",
    [
        (torch.tensor([[0, 1], [2, -1]]), r"layer 3, microbatch 5, token 1: a row mixes -1"),
        (torch.tensor([[0, 1], [2, 8]]), r"layer 3, microbatch 5, token 1: expert id out of range"),
        (
            torch.tensor([[0, 1], [0, -2]]),
            r"layer 3, microbatch 5, token 1: expert id out of range",
        ),
        (torch.tensor([[0, 1], [4, 4]]), r"layer 3, microbatch 5, token 1: duplicate expert id"),
        (torch.tensor([[0.0, 1.0]]), r"layer 3, microbatch 5: expected an integer dtype"),
        (torch.tensor([[0, 1, 2]]), r"expected shape \[tokens, topk=2\], got \(1, 3\)"),
        (torch.tensor([0, 1]), r"expected shape \[tokens, topk=2\], got \(2,\)"),
    ],
)
def test_bad_routes_name_layer_and_first_bad_token(routes, message):
    with pytest.raises(ValueError, match=message):
        check(routes, microbatch=5)


def test_wrong_token_count_names_expected_and_got():
    with pytest.raises(ValueError, match=r"layer 3: expected 4 tokens \(rows\), got 2"):
        check(torch.tensor([[0, 1], [2, 3]]), num_tokens=4)


def test_uint8_cannot_address_many_experts():
    with pytest.raises(ValueError, match="uint8 cannot hold expert ids up to 299"):
        check(torch.zeros(1, 2, dtype=torch.uint8), num_experts=300)


def test_nothing_is_clamped():
    routes = torch.tensor([[1, 9]])
    with pytest.raises(ValueError):
        check(routes)
    assert routes.tolist() == [[1, 9]]  # input untouched
