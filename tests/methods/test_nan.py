"""The NaN rule (docs/how-it-works.md, "NaN"): NaN scores are refused with a ValueError, never ranked."""

from __future__ import annotations

import math

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.methods._selectors import prune_smallest, prune_smallest_in_groups

NAN = math.nan

CASES = [
    ("l1_unstructured", {"sparsity": 3}),
    ("topk", {"sparsity": 3}),
    ("topk", {"density": 0.25}),
    ("ln_structured", {"sparsity": 1, "dim": 0}),
    ("block", {"sparsity": 1, "block_shape": (1, 2)}),
    ("nm", {"n": 2, "m": 4}),
    ("random_unstructured", {"sparsity": 2}),
    ("threshold", {"threshold": 0.5}),
    ("bernoulli", {"density": 0.5}),
]


@pytest.mark.parametrize("method,options", CASES)
def test_nan_scores_are_refused_by_every_method(method: str, options: dict) -> None:
    x = torch.tensor([[NAN, NAN, 1.0, 2.0], [3.0, 4.0, 5.0, 6.0]])
    with pytest.raises(ValueError, match="2 NaN value"):
        fxs.compute_mask(method, x, **options)


def test_issue_case_l1_unstructured_nan_keeps_nothing_silently() -> None:
    with pytest.raises(ValueError, match="NaN"):
        fxs.compute_mask("l1_unstructured", torch.tensor([NAN, NAN, 1.0, 2.0]), sparsity=3)


def test_selectors_refuse_nan_too() -> None:
    with pytest.raises(ValueError, match="NaN"):
        prune_smallest(torch.tensor([NAN, 1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="NaN"):
        prune_smallest_in_groups(torch.tensor([[NAN, 1.0, 2.0, 3.0]]), 2)


def test_infinities_are_ranked_and_counts_stay_exact() -> None:
    x = torch.tensor([math.inf, -math.inf, 1.0, -2.0, 0.5, math.inf])
    keep = fxs.compute_mask("l1_unstructured", x, sparsity=3)  # |x|: inf, inf, 1, 2, .5, inf
    assert int((~keep).sum()) == 3 and keep.tolist() == [True, True, False, False, False, True]
    keep = fxs.compute_mask("topk", x, sparsity=2)  # raw: -inf and -2 go
    assert keep.tolist() == [True, False, True, False, True, True]


def test_large_tensor_with_one_nan_is_refused() -> None:
    x = torch.randn(300_000)
    x[123_456] = NAN
    with pytest.raises(ValueError, match="1 NaN value"):
        fxs.compute_mask("l1_unstructured", x, sparsity=0.5)
