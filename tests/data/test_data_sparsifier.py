"""DataSparsifier: any registered mask method on tensors and embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify.data as fxd
from fx_sparsify.methods import compute_mask


def test_methods_give_compute_mask_results():
    w = torch.randn(8, 16)
    for method, options in [
        ("l1_unstructured", dict(sparsity=0.5)),
        ("nm", dict(n=2, m=4)),
        ("2:4", dict()),
        ("block", dict(sparsity=0.5, block_shape=(2, 2))),
        ("threshold", dict(threshold=0.5)),
    ]:
        s = fxd.DataSparsifier(method=method, **options)
        s.add_data("w", w)
        s.step()
        assert torch.equal(s.get_mask("w"), compute_mask(method, w, **options))


def test_per_data_method_replaces_default_options():
    s = fxd.DataSparsifier(method="l1_unstructured", sparsity=0.25)
    s.add_data("a", torch.randn(4, 8))
    s.add_data("b", torch.randn(4, 8), method="nm", n=1, m=4)
    s.add_data("c", nn.Embedding(6, 8), sparsity=0.75)
    assert s.data_groups["b"] == {"method": "nm", "n": 1, "m": 4}
    assert s.data_groups["c"] == {"method": "l1_unstructured", "sparsity": 0.75}
    s.step()
    assert s.get_mask("b").sum() == 8 and s.get_mask("c").sum() == 12


def test_seeded_random_methods_are_reproducible():
    masks = []
    for _ in range(2):
        s = fxd.DataSparsifier(method="random_unstructured", sparsity=0.5, seed=3)
        s.add_data("w", torch.randn(10, 10))
        s.step()
        masks.append(s.get_mask("w").clone())
    assert torch.equal(*masks)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(method="l1_unstructured", sparsty=0.5), TypeError),  # misspelt option
        (dict(method="no_such_method"), KeyError),
        (dict(method="l1_unstructured"), TypeError),  # missing required option
        (dict(method="l1_unstructured", sparsity=0.5, seed="x"), TypeError),
    ],
)
def test_bad_constructor(kwargs, error):
    with pytest.raises(error):
        fxd.DataSparsifier(**kwargs)


def test_bad_per_data_options_register_nothing():
    s = fxd.DataSparsifier(method="l1_unstructured", sparsity=0.5)
    with pytest.raises(TypeError, match="did you mean"):
        s.add_data("w", torch.randn(4, 4), sparsty=0.1)
    assert not s.data_groups


def test_squash_and_state_dict_round_trip():
    w = torch.randn(6, 8)
    s = fxd.DataSparsifier(method="nm", n=2, m=4)
    s.add_data("w", w)
    s.step()
    fresh = fxd.DataSparsifier(method="dense")
    fresh.load_state_dict(s.state_dict())
    assert torch.equal(fresh.get_mask("w"), s.get_mask("w"))
    s.squash_mask()
    assert int((w != 0).sum()) == 24


def test_options_that_do_not_fit_the_data_shape_fail_at_add_data_and_step_is_all_or_nothing():
    sparsifier = fxd.DataSparsifier(method="l1_unstructured", sparsity=0.5)
    sparsifier.add_data("a", torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"data 'b' \(shape \(4, 6\)\).*not divisible by m=4"):
        sparsifier.add_data("b", torch.randn(4, 6), method="nm", n=2, m=4)
    assert "b" not in sparsifier.data_groups
    # a config that goes bad later (edited by hand) fails step() before any mask or the count changes
    sparsifier.add_data("c", torch.randn(4, 8), method="nm", n=2, m=4)
    sparsifier.data_groups["c"]["m"] = 3
    before = sparsifier.get_mask("a").clone()
    with pytest.raises(ValueError, match="data 'c'"):
        sparsifier.step()
    assert torch.equal(sparsifier.get_mask("a"), before) and sparsifier._step_count == 0


def test_an_int_sparsity_that_looks_like_a_percentage_warns_at_add_data() -> None:
    """As in the graph pipeline: ``sparsity=50`` prunes 50 entries; warn once, where the data is added."""
    import warnings

    sparsifier = fxd.DataSparsifier(method="l1_unstructured", sparsity=50)
    with pytest.warns(
        UserWarning,
        match=r"DataSparsifier data 'emb': sparsity=50 is an int, so it prunes 50 of the "
        r"6400 entries",
    ) as caught:
        sparsifier.add_data("emb", torch.randn(100, 64))
    assert caught[0].filename == __file__  # points at the user's call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsifier.step()  # counts stay counts, and the step does not warn again
        sparsifier.add_data("small", torch.randn(10, 10), sparsity=0.5)  # a fraction
        sparsifier.add_data("rows", torch.randn(100, 64), method="ln_structured", sparsity=2, dim=0)  # slices
    assert int((~sparsifier.get_mask("emb")).sum()) == 50
