"""In-place ops (``nn.ReLU(inplace=True)``, ``x.relu_()``, ``torch.relu_(x)``, ``out += identity``) through
squash, the channel analysis and the shrink's constant folding, in both captures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs


class ActUnused(nn.Module):
    """An in-place activation whose result is unused: it still changes ``h`` for ``fc2``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)
        with torch.no_grad():
            self.fc1.bias.fill_(-0.3)  # a pruned row's constant that the ReLU changes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.how == "module":
            self.act(h)
        elif self.how == "method":
            h.relu_()
        else:
            torch.relu_(h)
        return self.fc2(h)


HOWS = ["module", "method", "function"]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", HOWS)
def test_squash_keeps_in_place_ops_whose_result_is_unused(how: str, capture: str) -> None:
    """Squash's dead-code elimination dropped them in an fx capture (torch's purity test misses them)."""
    torch.manual_seed(0)
    model, x = ActUnused(how).eval(), torch.randn(5, 4)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5}]},
                             capture=capture, example_inputs=(x,))
    sgm.eval()
    sgm.step()
    with torch.no_grad():
        masked = sgm(x)
        torch.testing.assert_close(sgm.squash()(x), masked)
        torch.testing.assert_close(sgm.squash(storage="csr")(x), masked)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", HOWS)
def test_shrink_does_not_fold_a_constant_an_in_place_op_rewrote(how: str, capture: str) -> None:
    """A zero row's constant (its bias, -0.3) is rewritten in place by the ReLU before fc2 reads it: folding
    -0.3 into fc2's bias was wrong; the channel now stays (or is folded as the value fc2 really reads)."""
    torch.manual_seed(0)
    model, x = ActUnused(how).eval(), torch.randn(5, 4)
    spec = {"weights": [{"target": "fc1", "method": "ln_structured", "sparsity": 0.5, "dim": 0, "p": 2}]}
    sgm = fxs.sparsify_graph(model, spec, capture=capture, example_inputs=(x,))
    sgm.eval()
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    if capture == "fx":  # fc2 reads fc1's output node itself, after the ReLU rewrote it: the rows stay
        assert small.get_parameter("fc1.weight").shape == (8, 4)
