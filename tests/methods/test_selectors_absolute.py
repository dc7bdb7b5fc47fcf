"""``prune_smallest(..., absolute=True)`` ranks |x| a chunk at a time, exactly as on ``x.abs()``."""

from __future__ import annotations

import pytest
import torch

from fx_sparsify.methods import _selectors
from fx_sparsify.methods._selectors import prune_smallest


@pytest.mark.parametrize("n", [10, 5000, 300_001])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.93])
def test_absolute_ranking_equals_ranking_the_abs_copy(n: int, fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_selectors, "CHUNK", 4096)  # many chunks, ties across chunk borders
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-50, 50, (n,), generator=gen).float() / 7  # many exact ties in |x|, both signs
    k = round(fraction * n)
    assert torch.equal(prune_smallest(x.view(-1, 1), k, absolute=True), prune_smallest(x.abs().view(-1, 1), k))
