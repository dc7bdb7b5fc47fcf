"""Our masks equal the references' (torch.nn.utils.prune, torch.ao.pruning) on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import prune

from fx_sparsify.methods import compute_mask

from ._reference import tie_free, wns_mask


def _prune_mask(method: prune.BasePruningMethod, t: torch.Tensor) -> torch.Tensor:
    return method.compute_mask(t, default_mask=torch.ones_like(t)).bool()


@pytest.mark.parametrize("shape", [(7,), (6, 5), (3, 4, 5)])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.75, 1.0, 3, 0.1])
def test_l1_unstructured_equals_prune(shape: tuple[int, ...], amount: float) -> None:
    t = tie_free(shape)
    ref = _prune_mask(prune.L1Unstructured(amount=amount), t)
    torch.testing.assert_close(compute_mask("l1_unstructured", t, sparsity=amount), ref)


@pytest.mark.parametrize("p", [1, 2, 3, 0.5, math.inf, -math.inf])
@pytest.mark.parametrize(("shape", "dim"), [((8, 6), 0), ((8, 6), 1), ((8, 6), -1), ((4, 5, 6), 2), ((4, 5, 6), 1)])
@pytest.mark.parametrize("amount", [0.25, 0.5, 2])
def test_ln_structured_equals_prune(p: float, shape: tuple[int, ...], dim: int, amount: float) -> None:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ref = _prune_mask(prune.LnStructured(amount=amount, n=p, dim=dim), t)
    torch.testing.assert_close(compute_mask("ln_structured", t, sparsity=amount, p=p, dim=dim), ref)


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 7, 1.0])
def test_random_unstructured_count_equals_prune(amount: float) -> None:
    t = torch.randn(6, 9)
    ref = _prune_mask(prune.RandomUnstructured(amount=amount), t)
    ours = compute_mask("random_unstructured", t, sparsity=amount, generator=torch.Generator().manual_seed(1))
    assert int(ours.sum()) == int(ref.sum())


@pytest.mark.parametrize(("shape", "dim"), [((10, 3), 0), ((10, 3), 1), ((4, 6, 5), 1)])
@pytest.mark.parametrize("amount", [0.3, 0.5, 1])
def test_random_structured_count_equals_prune(shape: tuple[int, ...], dim: int, amount: float) -> None:
    t = torch.randn(shape)
    ref = _prune_mask(prune.RandomStructured(amount=amount, dim=dim), t)
    ours = compute_mask("random_structured", t, sparsity=amount, dim=dim, generator=torch.Generator().manual_seed(1))
    assert int(ours.sum()) == int(ref.sum())
    # whole slices: every slice along dim is all kept or all pruned
    per_slice = ours.movedim(dim, 0).reshape(shape[dim], -1)
    assert bool((per_slice.all(1) | ~per_slice.any(1)).all())


BLOCK_CONFIGS = [
    # (sparsity_level, sparse_block_shape, zeros_per_block, norm)
    (1.0, (1, 4), 2, 2),  # the 2:4 recipe: every block pruned, 2 of 4 zeroed inside each
    (1.0, (1, 4), 2, 1),
    (0.5, (1, 4), None, 2),
    (0.5, (1, 4), None, 1),
    (0.3, (2, 2), None, 2),
    (0.7, (4, 1), None, 1),
    (0.5, (2, 2), 1, 2),  # half the blocks partly pruned: 1 zero in each pruned block
    (0.5, (3, 2), 4, 1),
    (0.25, (1, 1), None, 2),
    (1.0, (1, 8), 4, 2),
]


@pytest.mark.parametrize(("level", "block_shape", "zpb", "norm"), BLOCK_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_equals_weight_norm_sparsifier(
    level: float, block_shape: tuple[int, int], zpb: int | None, norm: int, seed: int
) -> None:
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(seed))
    ref = wns_mask(w, sparsity_level=level, sparse_block_shape=block_shape, zeros_per_block=zpb, norm=norm)
    ours = compute_mask("block", w, sparsity=level, block_shape=block_shape, zeros_per_block=zpb, p=norm)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("shape", [(7, 10), (5, 13), (9, 9)])
@pytest.mark.parametrize(("level", "block_shape"), [(0.5, (1, 4)), (0.3, (2, 2)), (0.6, (3, 2)), (0.5, (4, 1))])
def test_block_ragged_shapes_equal_weight_norm_sparsifier(
    shape: tuple[int, int], level: float, block_shape: tuple[int, int]
) -> None:
    # Edge blocks are partial: the reference pads and averages them over their in-bounds entries.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    ref = wns_mask(w, sparsity_level=level, sparse_block_shape=block_shape, zeros_per_block=None)
    ours = compute_mask("block", w, sparsity=level, block_shape=block_shape)
    torch.testing.assert_close(ours, ref)


def test_block_2_4_recipe_is_nm() -> None:
    w = torch.randn(16, 32)
    torch.testing.assert_close(
        compute_mask("block", w, sparsity=1.0, block_shape=(1, 4), zeros_per_block=2), compute_mask("2:4", w)
    )


def test_block_rounding_differs_from_reference_cap() -> None:
    # round(0.97 * 16 blocks) = 16: we prune every block; WeightNormSparsifier caps at 15.
    w = torch.randn(4, 16)
    ours = compute_mask("block", w, sparsity=0.97, block_shape=(1, 4))
    ref = wns_mask(w, sparsity_level=0.97, sparse_block_shape=(1, 4), zeros_per_block=None)
    assert int(ours.sum()) == 0
    assert int(ref.sum()) == 4
