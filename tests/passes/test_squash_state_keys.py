"""Squash keeps every state_dict key of the original model, also tensors the graph never reads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

SPEC = {"weights": [{"target": "fc", "method": "l1_unstructured", "sparsity": 0.5}]}


class Counter(nn.Module):
    """The issue's minimal repro: a buffer ``forward`` never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.tensor(7))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass outside torch.nn, so fx traces through it and the
    graph reads weight, bias and running statistics but never num_batches_tracked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # the only place timm reads the counter
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return torch.relu(x)


class ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn1 = BatchNormAct2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn1(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("make,shape", [(Counter, (2, 4)), (ConvBNAct, (2, 3, 6, 6))])
def test_unread_buffers_survive_squash(make, shape, capture: str) -> None:
    model = make().eval()
    x = torch.randn(*shape)
    sgm = fxs.sparsify_graph(model, SPEC, capture=capture, example_inputs=(x,))
    sgm.step()
    squashed = sgm.squash()
    assert set(squashed.state_dict()) == set(model.state_dict())
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(squashed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), squashed(x))
    if make is Counter:
        assert int(squashed.state_dict()["calls"]) == 7
        assert "calls" in sgm.state_dict()  # the sparse module's state_dict has it too
