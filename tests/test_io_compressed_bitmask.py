"""``load_compressed(path, model, storage="bitmask")`` (SPEC §18): the file's values and mask become the layers'
runtime storage, never a dense weight; outputs equal the dense model's (tolerance: the summation order
differs, ``atol=rtol=1e-5`` in float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._bitmask import BitmaskLinear


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 200)  # sizes no other tensor here has (the memory test looks for them)
        self.down = nn.Linear(200, 64, bias=False)
        self.pw = nn.Conv2d(64, 24, 1)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)
        self.tied = nn.Linear(10, 64)
        self.tied.weight = nn.Parameter(self.head.weight.T.contiguous())  # not tied: a separate weight
        self.k3 = nn.Conv2d(64, 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.down(torch.relu(self.up(x))))
        return self.head(h) + self.pw(h[:, :, None, None]).mean() + self.k3.weight.mean()


def _pruned(zeros: float = 0.6) -> Model:
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for layer in (model.up, model.down, model.pw, model.k3):
            layer.weight.mul_(torch.rand_like(layer.weight) >= zeros).add_(0.0)  # +0.0 where pruned
    return model


def test_bitmask_load_equals_the_dense_load(tmp_path: Path) -> None:
    model = _pruned()
    path = tmp_path / "m.safetensors"
    fxs.save_compressed(model, path)
    x = torch.randn(3, 64)
    dense = fxs.load_compressed(path, Model())
    small = fxs.load_compressed(path, Model(), storage="bitmask")
    assert isinstance(small.up, BitmaskLinear) and isinstance(small.down, BitmaskLinear)
    assert isinstance(small.pw, BitmaskLinear) and small.pw.spatial == 2
    assert not isinstance(small.k3, BitmaskLinear)  # a 3x3 conv: expanded as before
    torch.testing.assert_close(small(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense(x), model(x))
    sd, want = small.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in want)
    assert small.up.values.numel() - 32 == int((model.up.weight != 0).sum())  # the file's values (+ the padding)


def test_an_empty_meta_model_gets_only_the_files_tensors(tmp_path: Path) -> None:
    """A model built on the meta device: the layers are made from the file, no dense weight is allocated."""
    model = _pruned(0.7)
    path = tmp_path / "m.safetensors"
    fxs.save_compressed(model, path)
    with torch.device("meta"):
        empty = Model()
    with torch.profiler.profile(profile_memory=True) as prof:
        small = fxs.load_compressed(path, empty, storage="bitmask")
    sizes = {e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0}
    assert model.k3.weight.nbytes in sizes  # the 3x3 conv is expanded (the profiler sees dense allocations)
    for layer in (model.up, model.down, model.pw):  # the bitmask layers: never a dense weight
        assert layer.weight.nbytes not in sizes
    assert all(t.device.type == "cpu" for t in small.state_dict().values())
    x = torch.randn(2, 64)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_bad_storage_arguments(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    fxs.save_compressed(_pruned(), path)
    with pytest.raises(ValueError, match="'bitmask' with a model"):
        fxs.load_compressed(path, storage="bitmask")
    with pytest.raises(ValueError, match="storage='csr'"):
        fxs.load_compressed(path, Model(), storage="csr")
    with pytest.raises(ValueError, match="keys do not match"):  # checked before any layer is replaced
        target = nn.Sequential(nn.Linear(64, 256))
        fxs.load_compressed(path, target, storage="bitmask")
    assert type(target[0]) is nn.Linear
