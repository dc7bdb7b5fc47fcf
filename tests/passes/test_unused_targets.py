"""A weight target the forward never reads is an error naming it, for every capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_unused_weight_target_is_named(capture: str) -> None:
    spec = {"weights": [{"target": "unused", "method": "l1_unstructured", "sparsity": 0.5}]}
    with pytest.raises(ValueError, match=r"'unused.weight' are never used by the captured graph's forward"):
        fxs.sparsify_graph(Unused(), spec, capture=capture, example_inputs=(torch.randn(2, 4),))
