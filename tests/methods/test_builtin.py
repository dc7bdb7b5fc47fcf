"""Built-in methods: semantics, exact counts under ties, randomness, and errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fx_sparsify.methods import compute_mask, count_to_prune


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- counting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "n", "k"), [(0.5, 5, 2), (0.7, 5, 4), (0.5, 7, 4), (0.25, 10, 2), (3, 5, 3), (0, 4, 0), (1.0, 4, 4)]
)
def test_count_to_prune_rounds_half_to_even(amount: float, n: int, k: int) -> None:
    assert count_to_prune(amount, n) == k


@pytest.mark.parametrize(
    ("amount", "error", "match"),
    [
        (1.5, ValueError, "in \\[0, 1\\]"),
        (-0.1, ValueError, "in \\[0, 1\\]"),
        (-1, ValueError, "count"),
        (11, ValueError, "\\[0, 10\\]"),
        ("0.5", TypeError, "str"),
        (True, TypeError, "bool"),
        (math.nan, ValueError, "fraction"),
    ],
)
def test_count_to_prune_rejects(amount: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        count_to_prune(amount, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
@pytest.mark.parametrize("k", [0, 1, 5, 9, 10, 11, 12])
def test_exact_counts_under_ties(method: str, k: int) -> None:
    t = torch.tensor([-2.0, 0.0, 2.0, 2.0, 0.0, -2.0, 0.0, 2.0, -2.0, 0.0, 2.0, 0.0]).reshape(3, 4)
    mask = (
        compute_mask(method, t, sparsity=k, generator=_gen())
        if method.startswith("random")
        else compute_mask(method, t, sparsity=k)
    )
    assert int((~mask).sum()) == k
    # everything pruned ranks no higher than anything kept
    if method == "l1_unstructured" and 0 < k < 12:
        assert t.abs()[~mask].max() <= t.abs()[mask].min()


def test_topk_ties_exact_on_large_tensor() -> None:
    # large enough for the sampled band search; only three distinct values
    t = torch.tensor([-2.0, 0.0, 2.0]).repeat(40_000)[torch.randperm(120_000)]
    for k in (1, 39_999, 40_000, 40_001, 79_999, 80_000, 100_000):
        mask = compute_mask("topk", t, sparsity=k)
        assert int((~mask).sum()) == k
        assert t[~mask].max() <= t[mask].min()


def test_l1_large_tensor_matches_sort() -> None:
    t = torch.randn(300, 700)
    for k in (1, 1000, 105_000, 209_999):
        mask = compute_mask("l1_unstructured", t, sparsity=k)
        threshold = t.abs().reshape(-1).sort().values[k - 1]
        torch.testing.assert_close(mask, t.abs() > threshold)


# ---- topk / threshold / dense -------------------------------------------------------------------


def test_topk_keeps_largest_raw_values_not_magnitude() -> None:
    t = torch.tensor([-5.0, 1.0, 3.0, -0.5])
    torch.testing.assert_close(compute_mask("topk", t, density=0.5), torch.tensor([False, True, True, False]))
    torch.testing.assert_close(compute_mask("TOPK{0.25}", t), torch.tensor([False, False, True, False]))
    torch.testing.assert_close(compute_mask("topk", t, sparsity=1), torch.tensor([False, True, True, True]))


@pytest.mark.parametrize("kwargs", [{}, {"density": 0.5, "sparsity": 0.5}])
def test_topk_needs_exactly_one_amount(kwargs: dict[str, float]) -> None:
    with pytest.raises(TypeError, match="exactly one of density"):
        compute_mask("topk", torch.randn(4), **kwargs)


def test_threshold_and_dense() -> None:
    t = torch.tensor([-0.3, 0.1, 0.2, -0.05, 0.0])
    torch.testing.assert_close(
        compute_mask("threshold", t, threshold=0.1), torch.tensor([True, True, True, False, False])
    )
    assert bool(compute_mask("dense", t).all())
    with pytest.raises(ValueError, match="negative"):
        compute_mask("threshold", t, threshold=-1.0)


# ---- N:M ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 4), (0, 4), (4, 4), (5, 16), (1, 2)])
@pytest.mark.parametrize("dim", [0, 1, -1, 2])
def test_nm_holds_in_every_group_along_dim(n: int, m: int, dim: int) -> None:
    t = torch.randn(16, 32, 48)
    mask = compute_mask("nm", t, n=n, m=m, dim=dim)
    groups = mask.movedim(dim, -1).reshape(-1, m)
    assert bool((groups.sum(1) == n).all())
    # the kept ones are the largest |x| of their group
    scores = t.abs().movedim(dim, -1).reshape(-1, m)
    if 0 < n < m:
        kept_min = torch.where(groups, scores, math.inf).amin(1)
        pruned_max = torch.where(groups, -math.inf, scores).amax(1)
        assert bool((pruned_max <= kept_min).all())


def test_nm_exact_under_ties_and_alias() -> None:
    t = torch.tensor([[2.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = compute_mask("block_topk", t, n=2, m=4)
    assert mask.reshape(-1, 4).sum(1).tolist() == [2, 2]
    assert bool(mask[0, 3] == False)  # noqa: E712  (0 never beats 2)


def test_nm_shorthands() -> None:
    t = torch.randn(8, 16)
    torch.testing.assert_close(compute_mask("2:4", t), compute_mask("nm", t, n=2, m=4, dim=-1))
    torch.testing.assert_close(compute_mask("BTOPK{2:4,0}(U)", t), compute_mask("nm", t, n=2, m=4, dim=0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 2, "m": 3}, ValueError, "not divisible by m=3"),
        ({"n": 5, "m": 4}, ValueError, "n must be <= m"),
        ({"n": 2, "m": 4, "dim": 2}, ValueError, "out of range"),
        ({"n": 2.0, "m": 4}, TypeError, "int"),
        ({"n": -1, "m": 4}, ValueError, ">= 0"),
        ({"n": 0, "m": 0}, ValueError, ">= 1"),
    ],
)
def test_nm_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        compute_mask("nm", torch.randn(8, 8), **kwargs)


# ---- block --------------------------------------------------------------------------------------


def test_block_prunes_whole_blocks_of_smallest_norm() -> None:
    t = torch.ones(4, 8)
    t[0, 4:] = 0.1  # block (0, 1) of shape (2, 4) is weakest
    t[1, 4:] = 0.1
    mask = compute_mask("block", t, sparsity=1, block_shape=(2, 4))
    expected = torch.ones(4, 8, dtype=torch.bool)
    expected[:2, 4:] = False
    torch.testing.assert_close(mask, expected)


def test_block_zeros_per_block_inside_pruned_blocks_only() -> None:
    t = torch.randn(6, 16)
    mask = compute_mask("block", t, sparsity=0.5, block_shape=(1, 4), zeros_per_block=1, p=1)
    per_block = (~mask).reshape(-1, 4).sum(1)
    assert sorted(per_block.tolist()) == [0] * 12 + [1] * 12


def test_block_on_1d_and_3d() -> None:
    t = torch.randn(16)
    mask = compute_mask("block", t, sparsity=0.5, block_shape=(1, 4))
    assert (~mask).reshape(4, 4).all(1).sum() == 2
    t3 = torch.randn(2, 4, 8)
    mask3 = compute_mask("block", t3, sparsity=0.5, block_shape=(2, 2))
    blocks = mask3.reshape(2, 2, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(16, 4)
    assert bool((blocks.all(1) | ~blocks.any(1)).all()) and int((~blocks.any(1)).sum()) == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 0.5, "block_shape": (2, 2), "zeros_per_block": 5}, ValueError, "more than the 4"),
        ({"sparsity": 0.5, "block_shape": (0, 4)}, ValueError, "positive"),
        ({"sparsity": 0.5, "block_shape": "1x4"}, TypeError, "tuple of ints"),
        ({"sparsity": 0.5, "p": 0}, ValueError, "p > 0"),
        ({"sparsity": 1.5}, ValueError, "\\[0, 1\\]"),
        ({"sparsity": 0.5, "zeros_per_block": -1}, ValueError, ">= 0"),
        ({"sparsity": 0.5, "block_shape": (2, 1, 4)}, ValueError, "more dims"),
    ],
)
def test_block_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        compute_mask("block", torch.randn(8, 8), **kwargs)


# ---- structured ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ln_structured", "random_structured"])
def test_structured_errors(method: str) -> None:
    with pytest.raises(ValueError, match="at least 2 dims"):
        compute_mask(method, torch.randn(8), sparsity=0.5)
    with pytest.raises(ValueError, match="out of range"):
        compute_mask(method, torch.randn(4, 4), sparsity=0.5, dim=2)
    with pytest.raises(ValueError, match="\\[0, 4\\]"):
        compute_mask(method, torch.randn(4, 4), sparsity=5)


# ---- random -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("random_unstructured", {"sparsity": 0.5}),
        ("random_structured", {"sparsity": 0.5, "dim": 1}),
        ("bernoulli", {"density": 0.3}),
    ],
)
def test_random_methods_follow_the_generator(method: str, kwargs: dict[str, float]) -> None:
    t = torch.randn(32, 64)
    a = compute_mask(method, t, generator=_gen(7), **kwargs)
    b = compute_mask(method, t, generator=_gen(7), **kwargs)
    c = compute_mask(method, t, generator=_gen(8), **kwargs)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # None falls back to torch's default generator
    torch.manual_seed(3)
    d = compute_mask(method, t, **kwargs)
    torch.manual_seed(3)
    torch.testing.assert_close(compute_mask(method, t, **kwargs), d)


def test_random_unstructured_prunes_zeros_first_and_restep_is_stable() -> None:
    t = torch.randn(40, 50)
    mask = compute_mask("random_unstructured", t, sparsity=0.5, generator=_gen(1))
    again = compute_mask("random_unstructured", t * mask, sparsity=0.5, generator=_gen(2))
    torch.testing.assert_close(again, mask)
    more = compute_mask("random_unstructured", t * mask, sparsity=0.75, generator=_gen(3))
    assert int((~more).sum()) == 1500 and not bool((more & ~mask).any())


def test_random_structured_prunes_zero_slices_first() -> None:
    t = torch.randn(10, 6)
    t[[1, 4, 7]] = 0
    mask = compute_mask("random_structured", t, sparsity=3, dim=0, generator=_gen(5))
    assert (~mask).all(1).nonzero().squeeze(1).tolist() == [1, 4, 7]


def test_bernoulli_density_and_zeros() -> None:
    t = torch.randn(200, 500)
    mask = compute_mask("bernoulli", t, density=0.3, generator=_gen())
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    masked = t * mask
    again = compute_mask("BERN{0.3}", masked, generator=_gen(1))
    assert not bool((again & ~mask).any())  # pruned entries stay pruned
    assert abs(again.float().mean().item() - 0.3) < 0.01  # and the density holds
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        compute_mask("bernoulli", t, density=1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_large_low_precision_exact_counts(dtype: torch.dtype) -> None:
    t = (torch.randn(300, 700) * 50).to(dtype)  # many exact ties in low precision
    for k in (1, 105_000, 209_999):
        mask = compute_mask("l1_unstructured", t, sparsity=k)
        assert int((~mask).sum()) == k
        assert t.abs()[~mask].max() <= t.abs()[mask].min()
