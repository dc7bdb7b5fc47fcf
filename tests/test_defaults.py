"""Defaults a first user relies on: "2:4" on a convolution groups input channels (as NVIDIA's ASP does),
and a glob or regex selects weights, biases only when the pattern names them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.methods import compute_mask


def _asp_reference(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """ASP's layout for a conv: (out, kh, kw, in) rows, groups of m input channels, the n largest |w| kept."""
    moved = weight.permute(0, 2, 3, 1).abs()
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(moved.shape).permute(0, 3, 1, 2)


def test_2_4_on_a_conv_groups_input_channels() -> None:
    """As the user hit it: "2:4" on a Conv2d grouped along the kernel width (3) and raised."""
    torch.manual_seed(0)
    weight = torch.randn(6, 8, 3, 3)
    keep = compute_mask("2:4", weight)
    assert torch.equal(keep, _asp_reference(weight, 2, 4))
    per_group = keep.permute(0, 2, 3, 1).reshape(-1, 4).sum(1)
    assert bool((per_group == 2).all())


def test_2_4_in_the_pipeline_on_conv_and_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    sgm = fxs.sparsify_graph(
        model,
        {"weights": [{"target": "type:Conv2d", "method": "2:4"}, {"target": "type:Linear", "method": "2:4"}]},
        example_inputs=(torch.randn(1, 4, 6, 6),),
    )
    sgm.step()
    masks = sgm.masks()
    assert torch.equal(masks["0.weight"], _asp_reference(model[0].weight.detach(), 2, 4))
    linear = masks["3.weight"].reshape(4, -1, 4)  # a Linear's dim 1 is its input features: as before
    assert bool((linear.sum(-1) == 2).all())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(sgm.squash()(x), sgm(x))


def test_an_explicit_dim_still_wins() -> None:
    weight = torch.randn(2, 3, 4, 4)
    keep = compute_mask("nm", weight, n=2, m=4, dim=-1)  # along the kernel width, as asked
    assert bool((keep.sum(-1) == 2).all())
    with pytest.raises(ValueError, match="not divisible by m=4"):
        compute_mask("nm", torch.randn(2, 3, 3, 3), n=2, m=4, dim=-1)
    assert compute_mask("2:4", torch.randn(8)).sum() == 4  # a 1-d tensor: its only dim


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.conv1(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "selector,expected",
    [
        ("conv*", ["conv1.weight", "conv2.weight"]),
        ("re:conv.*", ["conv1.weight", "conv2.weight"]),
        ("conv*.bias", ["conv1.bias", "conv2.bias"]),
        ("re:conv.*bias", ["conv1.bias", "conv2.bias"]),
        ("*.weight", ["conv1.weight", "conv2.weight", "head.weight"]),
    ],
)
def test_a_glob_selects_weights_unless_it_names_the_bias(selector: str, expected: list[str]) -> None:
    """As the user hit it: 'conv*' also selected (and pruned at 50 %) the biases."""
    spec = {"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(_Convs(), spec, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert sorted(sgm.sparsity()) == expected
