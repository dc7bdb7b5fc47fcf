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
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
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


class Versioned(nn.Module):
    """Like torchvision's MNASNet: ``_version = 2`` and a ``_load_from_state_dict`` that reads the
    version from the checkpoint's metadata (MNASNet rebuilds its old layout for a version < 2)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.block = VersionedBlock()
        self.fc = nn.Linear(4, 4)
        self.loaded: list[object] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:  # type: ignore[no-untyped-def]
        self.loaded.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class VersionedBlock(nn.Module):
    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.loaded: list[object] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:  # type: ignore[no-untyped-def]
        self.loaded.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_squashed_state_dict_keeps_the_modules_versions(capture: str) -> None:
    """The squashed state_dict's metadata says the original modules' ``_version`` (GraphModule's is 1),
    so a model that converts old checkpoints on load (MNASNet) takes it as its own."""
    model = Versioned().eval()
    x = torch.randn(2, 4)
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, capture=capture, example_inputs=(x,))
    sgm.step()
    squashed = sgm.squash()
    meta = squashed.state_dict()._metadata
    assert meta[""]["version"] == 2 and meta["block"]["version"] == 3
    fresh = Versioned()
    fresh.load_state_dict(squashed.state_dict())
    assert fresh.loaded == [2] and fresh.block.loaded == [3]
    torch.testing.assert_close(fresh.eval()(x), sgm(x))
