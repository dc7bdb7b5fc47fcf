"""DataNormSparsifier against the reference torch.ao.pruning DataNormSparsifier on the same data."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fx_sparsify.data as fxd
from fx_sparsify.data import data_norm_sparsifier as dns

from ._ref import RefDataNormSparsifier, ref_mask


def ours_mask(data, tie_break="index", **kwargs):
    sparsifier = fxd.DataNormSparsifier(tie_break=tie_break, **kwargs)
    sparsifier.add_data("x", data)
    sparsifier.step()
    return sparsifier.get_mask("x")


CASES = [
    ((16, 32), dict()),
    ((16, 32), dict(sparsity_level=0.7, sparse_block_shape=(2, 2))),
    ((10, 13), dict(sparsity_level=0.3, sparse_block_shape=(3, 4), zeros_per_block=5)),  # ragged
    ((7, 9), dict(sparsity_level=0.9, sparse_block_shape=(1, 2), zeros_per_block=1, norm="L2")),
    ((33, 5), dict(sparsity_level=0.5, sparse_block_shape=(4, 1), norm="L2")),
    ((64, 64), dict(sparsity_level=0.5, sparse_block_shape=(8, 4), zeros_per_block=20)),  # > 16 per block
    ((20, 8), dict(sparsity_level=0.0)),
    ((20, 8), dict(sparsity_level=1.0)),
    ((20, 8), dict(sparsity_level=1.0, zeros_per_block=2)),
    ((20, 8), dict(zeros_per_block=0)),
]


@pytest.mark.parametrize("shape,kwargs", CASES)
def test_masks_equal_reference_on_random_data(shape, kwargs):
    data = torch.randn(shape)
    expected = ref_mask(data, **kwargs)
    got = ours_mask(data, **kwargs)
    assert got.dtype == torch.bool and got.shape == data.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape,kwargs", CASES)
def test_reference_tie_break_is_bit_identical_on_tied_data(shape, kwargs):
    data = torch.randint(-2, 3, shape).float()  # many exact ties
    assert torch.equal(ours_mask(data, tie_break="reference", **kwargs), ref_mask(data, **kwargs))


@pytest.mark.parametrize("shape,kwargs", CASES[:5])  # blocks of <= 16 entries
def test_index_tie_break_differs_only_among_tied_blocks(shape, kwargs):
    data = torch.randint(-2, 3, shape).float()
    got, expected = ours_mask(data, **kwargs), ref_mask(data, **kwargs)
    assert got.sum() == expected.sum()  # the same number of entries pruned
    level = kwargs.get("sparsity_level", 0.5)
    bh, bw = kwargs.get("sparse_block_shape", (1, 4))
    norm = data.abs() if kwargs.get("norm", "L1") == "L1" else data * data
    scores = torch.nn.functional.avg_pool2d(norm[None, None], (bh, bw), (bh, bw), ceil_mode=True)[0, 0]
    k = round(level * scores.numel())
    if 0 < k < scores.numel():
        kth = scores.flatten().kthvalue(k).values
        tied = (scores == kth).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: shape[0], : shape[1]]
        assert not bool(((got != expected) & ~tied).any())


def test_chunked_processing_equals_reference(monkeypatch):
    monkeypatch.setattr(dns, "_CHUNK_ENTRIES", 64)  # forces many row chunks
    data = torch.randn(37, 22)
    for kwargs in (dict(sparse_block_shape=(3, 4), zeros_per_block=5), dict(sparse_block_shape=(2, 2))):
        assert torch.equal(ours_mask(data, **kwargs), ref_mask(data, **kwargs))


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 24),
    bh=st.integers(1, 4),
    bw=st.integers(1, 6),
    level=st.floats(0, 1),
    zfrac=st.floats(0, 1),
    norm=st.sampled_from(["L1", "L2"]),
    seed=st.integers(0, 99),
)
def test_property_reference_tie_break_matches_reference(h, w, bh, bw, level, zfrac, norm, seed):
    assume(h * w > 1)  # the reference crashes (IndexError) on data that squeezes to 0-D
    data = torch.randint(-3, 4, (h, w), generator=torch.Generator().manual_seed(seed)).float()
    kwargs = dict(sparsity_level=level, sparse_block_shape=(bh, bw), zeros_per_block=round(zfrac * bh * bw), norm=norm)
    assert torch.equal(ours_mask(data, tie_break="reference", **kwargs), ref_mask(data, **kwargs))


@pytest.mark.parametrize("shape", [(40,), (1, 40), (40, 1), (1, 8, 12)])
def test_squeezable_and_1d_data_keep_their_shape(shape):
    """The reference gives 1-D data a (1, n) mask; ours keeps the data's shape, same values."""
    data = torch.randn(shape)
    got = ours_mask(data, sparse_block_shape=(1, 4))
    assert got.shape == data.shape and got.dtype == torch.bool
    assert torch.equal(got, ref_mask(data, sparse_block_shape=(1, 4)))


def test_embeddings_and_parameters_match_reference():
    for data in (nn.Embedding(30, 8), nn.EmbeddingBag(30, 8), nn.Parameter(torch.randn(12, 8))):
        weight = data.weight if isinstance(data, nn.Module) else data
        assert torch.equal(ours_mask(data, sparsity_level=0.4), ref_mask(data, sparsity_level=0.4))
        assert weight.requires_grad


def test_configs_equal_reference():
    kwargs = dict(sparsity_level=0.3, sparse_block_shape=(2, 2), zeros_per_block=3)
    ours, ref = fxd.DataNormSparsifier(**kwargs), RefDataNormSparsifier(**kwargs)
    for s in (ours, ref):
        s.add_data("a", torch.randn(4, 4))
        s.add_data("b", torch.randn(4, 4), sparsity_level=0.9)
    assert ours.defaults == ref.defaults
    assert ours.data_groups == dict(ref.data_groups)
    d = fxd.DataNormSparsifier(sparse_block_shape=(1, 2))
    assert (
        d.defaults["zeros_per_block"]
        == 2
        == RefDataNormSparsifier(sparse_block_shape=(1, 2)).defaults["zeros_per_block"]
    )


def test_repeated_step_is_stable_and_mask_object_kept():
    s = fxd.DataNormSparsifier(sparsity_level=0.5)
    s.add_data("x", torch.randn(8, 8))
    mask = s.get_mask("x")
    s.step()
    first = mask.clone()
    s.step()
    assert s.get_mask("x") is mask and torch.equal(mask, first)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(norm="L3"), ValueError),
        (dict(sparsity_level=1.5), ValueError),
        (dict(sparsity_level=-0.1), ValueError),
        (dict(sparsity_level="half"), TypeError),
        (dict(sparse_block_shape=(0, 4)), ValueError),
        (dict(sparse_block_shape=(4,)), ValueError),
        (dict(zeros_per_block=5), ValueError),
        (dict(zeros_per_block=-1), ValueError),
        (dict(tie_break="random"), ValueError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error) as info:
        fxd.DataNormSparsifier(**kwargs)
    assert not isinstance(info.value, AssertionError)


@pytest.mark.parametrize(
    "data,config,error",
    [
        (torch.randn(4, 4), dict(zeros_per_block=9), ValueError),  # the reference raises ValueError at step
        (torch.randn(2, 3, 4), dict(), ValueError),  # the reference: ValueError at step
        (torch.randint(0, 5, (4, 4)), dict(), TypeError),  # the reference: RuntimeError at step
        (torch.randn(4, 4), dict(sparsity=0.5), TypeError),  # misspelt key; the reference ignores it
    ],
)
def test_bad_data_or_config_rejected_at_add_data_nothing_registered(data, config, error):
    s = fxd.DataNormSparsifier()
    with pytest.raises(error, match=r"\w"):
        s.add_data("x", data, **config)
    assert "x" not in s.data_groups and "x" not in s.state
    s.step()  # still usable


def test_reference_raises_same_error_types_later():
    ref = RefDataNormSparsifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_data("x", torch.randn(4, 4), zeros_per_block=9)
        with pytest.raises(ValueError):
            ref.step()
        ref = RefDataNormSparsifier()
        ref.add_data("y", torch.randn(2, 3, 4))
        with pytest.raises(ValueError):
            ref.step()


def test_scheduler_value_checked_at_step():
    s = fxd.DataNormSparsifier()
    s.add_data("x", torch.randn(4, 4))
    s.data_groups["x"]["sparsity_level"] = 2.0  # e.g. written by hand
    mask = s.get_mask("x").clone()
    with pytest.raises(ValueError, match="sparsity_level"):
        s.step()
    assert torch.equal(s.get_mask("x"), mask)


def test_doc_ragged_counts_blocks_like_reference():
    data = torch.randn(5, 7)
    n_blocks = math.ceil(5 / 2) * math.ceil(7 / 3)
    got = ours_mask(data, sparsity_level=0.5, sparse_block_shape=(2, 3))
    assert torch.equal(got, ref_mask(data, sparsity_level=0.5, sparse_block_shape=(2, 3)))
    assert n_blocks == 9


def test_single_entry_data_works_where_reference_crashes():
    with pytest.raises(IndexError):
        ref_mask(torch.randn(1, 1))
    assert torch.equal(ours_mask(torch.tensor([[3.0]]), sparsity_level=1.0), torch.tensor([[False]]))
