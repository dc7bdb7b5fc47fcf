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
    sgm = fxs.sparsify_graph(
        model,
        {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5}]},
        capture=capture,
        example_inputs=(x,),
    )
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
    if capture == "fx":  # fc2 reads fc1's output node itself, after the ReLU rewrote it: the rows stay, saying why
        assert small.get_parameter("fc1.weight").shape == (8, 4)
        assert (
            "4 zero-row channel(s) kept: " in sgm.shrink_plan()
            and "in place and fc2 read(s) it too" in sgm.shrink_plan()
        )


class InplaceBlock(nn.Module):
    """A residual Conv-BN-ReLU block written as torchvision's ResNet: ``ReLU(inplace=True)``, ``out += x``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


def test_export_capture_shrinks_through_in_place_ops() -> None:
    """torch.export keeps ``aten.relu_`` / ``aten.add_``: the channel analysis had no rule for them, so no
    group of an export-captured ResNet could shrink ("no channel rule for function relu_.default")."""
    torch.manual_seed(0)
    model, x = InplaceBlock().eval(), torch.randn(2, 3, 8, 8)
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}, capture="export", example_inputs=(x,)
    )
    assert sgm._fxs.capture == "export"
    sgm.eval()
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert small.get_parameter("conv1.weight").shape[0] == 8
