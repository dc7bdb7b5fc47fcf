"""Property-based invariants over shapes, dtypes and amounts."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fx_sparsify.methods import compute_mask, count_to_prune

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def tensors(draw: st.DrawFn, min_dims: int = 1, max_dims: int = 3) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=min_dims, max_size=max_dims)))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # heavy ties: few distinct values
        t = t.round()
    return t.to(dtype)


amounts = st.one_of(st.floats(0, 1), st.integers(0, 10**6))


def _amount(amount: float | int, n: int) -> float | int:
    return amount if isinstance(amount, float) else amount % (n + 1)


@SETTINGS
@given(tensors(), amounts, st.sampled_from(["l1_unstructured", "random_unstructured", "topk"]))
def test_exact_count_methods_prune_exactly_k(t: torch.Tensor, amount: float | int, method: str) -> None:
    amount = _amount(amount, t.numel())
    k = count_to_prune(amount, t.numel())
    gen = torch.Generator().manual_seed(0)
    kwargs = {"generator": gen} if method.startswith("random") else {}
    mask = compute_mask(method, t, sparsity=amount, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == t.shape
    assert int((~mask).sum()) == k
    if method != "random_unstructured" and 0 < k < t.numel():
        scores = (t.abs() if method == "l1_unstructured" else t).float()
        assert scores[~mask].max() <= scores[mask].min()


@SETTINGS
@given(tensors(min_dims=2), amounts, st.sampled_from([1, 2, math.inf]), st.data())
def test_structured_prunes_exactly_k_whole_slices(
    t: torch.Tensor, amount: float | int, p: float, data: st.DataObject
) -> None:
    dim = data.draw(st.integers(-t.dim(), t.dim() - 1))
    amount = _amount(amount, t.shape[dim])
    k = count_to_prune(amount, t.shape[dim])
    for method, kwargs in (("ln_structured", {"p": p}), ("random_structured", {"generator": torch.Generator()})):
        mask = compute_mask(method, t, sparsity=amount, dim=dim, **kwargs)
        slices = mask.movedim(dim, 0).reshape(t.shape[dim], -1)
        assert bool((slices.all(1) | ~slices.any(1)).all())
        assert int((~slices.any(1)).sum()) == k


@SETTINGS
@given(tensors(), st.integers(1, 8), st.data())
def test_nm_holds_in_every_group(t: torch.Tensor, m: int, data: st.DataObject) -> None:
    dim = data.draw(st.integers(-t.dim(), t.dim() - 1))
    n = data.draw(st.integers(0, m))
    t = torch.cat([t] * m, dim=dim)  # make the dim divisible by m
    mask = compute_mask("nm", t, n=n, m=m, dim=dim)
    groups = mask.movedim(dim, -1).reshape(-1, m)
    assert bool((groups.sum(1) == n).all())
    scores = t.abs().float().movedim(dim, -1).reshape(-1, m)
    if 0 < n < m:
        assert bool(
            (torch.where(groups, -math.inf, scores).amax(1) <= torch.where(groups, scores, math.inf).amin(1)).all()
        )


@SETTINGS
@given(tensors(min_dims=2, max_dims=2), st.floats(0, 1), st.sampled_from([(1, 4), (2, 2), (1, 1), (3, 2)]), st.data())
def test_block_prunes_exactly_k_blocks(
    t: torch.Tensor, sparsity: float, block_shape: tuple[int, int], data: st.DataObject
) -> None:
    vpb = block_shape[0] * block_shape[1]
    zpb = data.draw(st.one_of(st.none(), st.integers(0, vpb)))
    mask = compute_mask("block", t, sparsity=sparsity, block_shape=block_shape, zeros_per_block=zpb)
    shape2 = t.shape
    bh, bw = block_shape
    gh, gw = -(-shape2[0] // bh), -(-shape2[1] // bw)
    k = count_to_prune(sparsity, gh * gw)
    padded = torch.ones(gh * bh, gw * bw, dtype=torch.int64)
    padded[: shape2[0], : shape2[1]] = mask.long()
    pruned_per_block = (1 - padded).reshape(gh, bh, gw, bw).sum((1, 3)).reshape(-1)
    real = torch.zeros(gh * bh, gw * bw, dtype=torch.int64)
    real[: shape2[0], : shape2[1]] = 1
    real_per_block = real.reshape(gh, bh, gw, bw).sum((1, 3)).reshape(-1)
    expected = torch.minimum(real_per_block, torch.tensor(vpb if zpb is None else zpb))
    if zpb == 0:
        assert bool(mask.all())
        return
    hit = pruned_per_block > 0
    assert int(hit.sum()) == k
    assert bool((pruned_per_block[hit] == expected[hit]).all())


@SETTINGS
@given(tensors(), st.floats(0, 1))
def test_all_keep_and_dense_masks(t: torch.Tensor, threshold: float) -> None:
    assert bool(compute_mask("dense", t).all())
    assert bool(compute_mask("l1_unstructured", t, sparsity=0).all())
    assert not bool(compute_mask("l1_unstructured", t, sparsity=1.0).any())
    torch.testing.assert_close(compute_mask("threshold", t, threshold=threshold), t.abs() >= threshold)


@SETTINGS
@given(tensors(), st.floats(0, 1), st.integers(0, 2**31))
def test_random_methods_are_reproducible_and_keep_zeros_pruned(t: torch.Tensor, amount: float, seed: int) -> None:
    for method, kwargs in (("random_unstructured", {"sparsity": amount}), ("bernoulli", {"density": amount})):
        a = compute_mask(method, t, generator=torch.Generator().manual_seed(seed), **kwargs)
        b = compute_mask(method, t, generator=torch.Generator().manual_seed(seed), **kwargs)
        torch.testing.assert_close(a, b)
        zeros = t == 0
        if method == "bernoulli" or int(zeros.sum()) <= count_to_prune(amount, t.numel()):
            assert not bool((a & zeros).any())
