"""l1_unstructured's keep mask is made packed, a chunk at a time, for large targets at step(): no bool mask of the
whole layer while ranking (the "mode": "inplace" memory goal, benchmarks/bench_memory.py). Same entries as the
bool selector, ties included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _masks
from fx_sparsify.methods import _selectors, builtin, get_mask_method, register_mask_method


def _unpacked(packed: _masks.PackedMask) -> torch.Tensor:
    out = torch.empty(packed.shape, dtype=torch.bool)
    packed.unpack_into(out)
    return out


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("n,ties", [(1000, False), (4099, True), (70_001, True), (70_001, False)])
def test_packed_selector_keeps_the_same_entries(
    monkeypatch: pytest.MonkeyPatch, absolute: bool, n: int, ties: bool
) -> None:
    monkeypatch.setattr(_selectors, "CHUNK", 1024)  # many chunks, ties across chunk edges
    scores = torch.randn(n)
    if ties:
        scores = (scores * 3).round()  # most values tied, zeros among them
    for k in (1, n // 3, n // 2, n - 1):
        expected = _selectors.prune_smallest(scores.view(-1, 1), k, absolute=absolute)
        got = _selectors.rank_smallest(scores.view(-1, 1), k, absolute=absolute).packed()
        assert got.shape == (n, 1) and torch.equal(_unpacked(got), expected), k


def test_step_ranks_large_l1_targets_without_a_bool_mask_of_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 8))  # 131072 and 2048 entries
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}], "mode": "inplace"}
    expected = fxs.sparsify_graph(model, spec)
    expected.step()
    calls: list[int] = []
    original = _selectors.prune_smallest

    def counting(scores: torch.Tensor, k: int, **kwargs: object) -> torch.Tensor:
        calls.append(scores.numel())
        return original(scores, k, **kwargs)

    monkeypatch.setattr(builtin, "prune_smallest", counting)
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    assert calls == [2048]  # only the small layer went through the bool selector
    for name, mask in expected.masks().items():
        assert torch.equal(sgm.masks()[name], mask), name


@pytest.mark.usefixtures("clean_registry")
def test_a_method_registered_over_l1_unstructured_is_still_called() -> None:
    assert get_mask_method("l1_unstructured").fn is builtin.PACKED_METHODS["l1_unstructured"][0]
    seen = []

    def mine(tensor: torch.Tensor, *, sparsity: float) -> torch.Tensor:
        seen.append(tensor.numel())
        return torch.ones_like(tensor, dtype=torch.bool)

    register_mask_method("l1_unstructured", override=True)(mine)
    sgm = fxs.sparsify_graph(
        nn.Sequential(nn.Linear(512, 256)), {"weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5}]}
    )
    sgm.step()
    assert seen == [131072] and bool(sgm.masks()["0.weight"].all())
