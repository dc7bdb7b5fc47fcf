"""``prune_smallest_many`` equals ranking the concatenation, without building it (SPEC §15)."""

from __future__ import annotations

import pytest
import torch

from fx_sparsify.methods import _selectors
from fx_sparsify.methods._global import prune_smallest_many
from fx_sparsify.methods._selectors import prune_smallest


@pytest.mark.parametrize("sizes", [[(3, 4)], [(300, 200), (100,), (250, 160)], [(512, 300), (7, 9)]])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("absolute", [True, False])
def test_many_equals_the_concatenation(
    sizes: list[tuple[int, ...]], fraction: float, absolute: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_selectors, "CHUNK", 5000)  # ties across chunk and tensor borders
    gen = torch.Generator().manual_seed(len(sizes))
    tensors = [(torch.randint(-40, 40, s, generator=gen).float() / 9) for s in sizes]
    tensors[-1] = tensors[-1].to(torch.bfloat16)  # mixed dtypes compare as float32, like a float cat
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    k = round(fraction * flat.numel())
    want = prune_smallest(flat.abs() if absolute else flat, k).split([t.numel() for t in tensors])
    got = prune_smallest_many(tensors, k, absolute=absolute)
    for g, w, t in zip(got, want, tensors):
        assert g.shape == t.shape and torch.equal(g.reshape(-1), w)


def test_nan_is_refused() -> None:
    a = torch.randn(300, 300)
    a[5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_smallest_many([torch.randn(300, 300), a], 1000, absolute=True)
