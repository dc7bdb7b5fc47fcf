"""The data sparsifier's step() is all or nothing, and its errors name the data."""

from __future__ import annotations

import math

import pytest
import torch

import fx_sparsify.data as fxd


def _sparsifier() -> tuple[fxd.DataSparsifier, torch.Tensor, torch.Tensor]:
    sp = fxd.DataSparsifier(method="random_unstructured", sparsity=0.5)  # seed=None: torch's default generator
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    sp.add_data("a", a)
    sp.add_data("b", b)
    return sp, a, b


def test_method_failing_on_the_second_data_leaves_the_first_unchanged() -> None:
    sp, a, b = _sparsifier()
    sp.step()
    before = {n: sp.get_mask(n).clone() for n in ("a", "b")}
    with torch.no_grad():
        b[0, 0] = math.nan  # the second data now fails (NaN scores are refused)
    rng = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"step\(\): data 'b': .*NaN"):
        sp.step()
    assert all(torch.equal(sp.get_mask(n), before[n]) for n in before)
    assert sp._step_count == 1
    assert torch.equal(torch.random.get_rng_state(), rng)  # the draws for 'a' were given back


def test_subclass_replacing_mask_data_is_restored_too() -> None:
    class Flaky(fxd.BaseDataSparsifier):
        def update_mask(self, name: str, data: torch.Tensor, **config: object) -> None:
            if name == "b":
                raise ValueError("cannot sparsify this one")
            self.get_mask(name).data = torch.zeros(data.shape, dtype=torch.int8)  # reference-style write

    sp = Flaky()
    sp.add_data("a", torch.randn(3, 3))
    sp.add_data("b", torch.randn(3, 3))
    mask = sp.get_mask("a")
    with pytest.raises(ValueError, match=r"data 'b': cannot sparsify this one"):
        sp.step()
    assert sp.get_mask("a") is mask and mask.dtype == torch.bool and bool(mask.all())
    assert sp._step_count == 0


def test_load_state_dict_errors_name_the_data() -> None:
    sp, _, _ = _sparsifier()
    sp.step()
    sd = sp.state_dict()
    sd["data_groups"]["b"] = {"method": "l1_unstructured", "sparsty": 0.5}  # misspelt option
    fresh = fxd.DataSparsifier(method="l1_unstructured", sparsity=0.5)
    with pytest.raises(TypeError, match=r"load_state_dict: data 'b': .*'sparsty'"):
        fresh.load_state_dict(sd)
    sd = sp.state_dict()
    sd["_container"]["a"] = "not a tensor"
    with pytest.raises(TypeError, match=r"data 'a'.*must be a tensor"):
        fresh.load_state_dict(sd)
    sd = sp.state_dict()
    sd["state"]["a"]["mask_shape"] = (5, 5)
    with pytest.raises(ValueError, match=r"data 'a'"):
        fresh.load_state_dict(sd)
    assert not fresh.data_groups  # nothing was loaded


@pytest.mark.parametrize("tie_break", ["index", "reference"])
def test_data_norm_sparsifier_refuses_nan_naming_the_data(tie_break: str) -> None:
    sp = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2), tie_break=tie_break)
    x = torch.randn(2, 8)
    x[1, 3] = math.nan
    sp.add_data("emb", x)
    with pytest.raises(ValueError, match=r"step\(\): data 'emb': the data contain 1 NaN"):
        sp.step()
    assert bool(sp.get_mask("emb").all()) and sp._step_count == 0
