"""BaseDataSparsifier: add_data / get / step / squash / state_dict / pickling, against the reference."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import fx_sparsify.data as fxd

from ._ref import RefBaseDataSparsifier, RefDataNormSparsifier


class ZeroFirst(fxd.BaseDataSparsifier):
    """The reference tests' ImplementedSparsifier: prunes the first row."""

    def update_mask(self, name, data, **kwargs):
        mask = self.get_mask(name)
        mask[0] = 0


class RefZeroFirst(RefBaseDataSparsifier):
    def update_mask(self, name, data, **kwargs):
        mask = self.get_mask(name)
        mask[0] = 0


class LikeReferenceSubclass(fxd.BaseDataSparsifier):
    """Written against the reference: replaces mask.data with an int8 tensor."""

    def update_mask(self, name, data, **kwargs):
        mask = self.get_mask(name)
        mask.data = (data.abs() > kwargs["threshold"]).to(torch.int8)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_public_names():
    for name in ("BaseDataSparsifier", "DataSparsifier", "DataNormSparsifier", "BaseDataScheduler"):
        assert name in fxd.__all__ and hasattr(fxd, name)
    with pytest.raises(TypeError):
        fxd.BaseDataSparsifier()  # abstract


@pytest.mark.parametrize("kind", ["tensor", "parameter", "embedding", "embedding_bag"])
def test_add_step_squash_match_reference(kind):
    def make():
        torch.manual_seed(1)
        return {
            "tensor": lambda: torch.randn(4, 6),
            "parameter": lambda: nn.Parameter(torch.randn(4, 6)),
            "embedding": lambda: nn.Embedding(4, 6),
            "embedding_bag": lambda: nn.EmbeddingBag(4, 6),
        }[kind]()

    ours_data, ref_data = make(), make()
    ours, ref = ZeroFirst(level=0.3), RefZeroFirst(level=0.3)
    out = ours.add_data("d", ours_data)
    ref_out = _quiet(ref.add_data, "d", ref_data)
    torch.testing.assert_close(out, ref_out)  # the masked data (all-keep at first)
    assert out.requires_grad == ref_out.requires_grad
    ours.step()
    ref.step()
    assert torch.equal(ours.get_mask("d"), ref.get_mask("d").bool())
    torch.testing.assert_close(ours.get_data("d", return_original=False), ref.get_data("d", return_original=False))
    torch.testing.assert_close(ours.get_data("d"), ref.get_data("d"))
    assert ours.data_groups == dict(ref.data_groups)
    ours.squash_mask()
    ref.squash_mask()
    ours_w = ours_data.weight if isinstance(ours_data, nn.Module) else ours_data
    ref_w = ref_data.weight if isinstance(ref_data, nn.Module) else ref_data
    torch.testing.assert_close(ours_w, ref_w)  # both write the masked values into the caller's object
    assert bool((ours_w[0] == 0).all())


def test_get_data_returns_callers_tensor_and_squash_writes_its_storage():
    x = torch.randn(4, 8)
    view = x[1:]  # shares x's storage
    emb = nn.Embedding(5, 4)
    s = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    s.add_data("x", x)
    s.add_data("emb", emb)
    assert s.get_data("x") is x and s.get_data("emb") is emb.weight
    s.step()
    ptr = x.data_ptr()
    s.squash_mask()
    assert x.data_ptr() == ptr  # in place: no new storage
    assert torch.equal(x == 0, ~s.get_mask("x"))
    assert torch.equal(view == 0, ~s.get_mask("x")[1:])  # views see the squash too
    assert torch.equal(emb.weight == 0, ~s.get_mask("emb"))
    with pytest.raises(ValueError, match="squashed"):
        s.get_data("x")  # originals are gone, as in the reference
    assert s.get_data("x", return_original=False) is x


def test_squash_leave_parametrized_false_keeps_values():
    x = torch.randn(4, 8)
    before = x.clone()
    s = ZeroFirst()
    s.add_data("x", x)
    s.step()
    s.squash_mask(leave_parametrized=False)
    assert torch.equal(x, before)
    assert s.get_data("x") is x  # the original values still exist


def test_squash_names_and_errors():
    s = ZeroFirst()
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    s.add_data("a", a)
    s.add_data("b", b)
    s.step()
    s.squash_mask(names=["a"])
    assert a[0].sum() == 0 and b[0].sum() == 2
    with pytest.raises(ValueError, match="already squashed"):
        s.squash_mask(names=["a"])
    with pytest.raises(ValueError, match="does not exist"):
        s.squash_mask(names=["zzz"])
    with pytest.raises(ValueError, match="squashed"):
        s.step()  # the reference raises ValueError here too
    s.squash_mask()  # the rest
    assert b[0].sum() == 0


def test_readd_replaces_data_keeps_mask_and_config():
    s = ZeroFirst(level=0.1)
    s.add_data("x", torch.ones(3, 3), level=0.5)
    s.step()
    mask = s.get_mask("x")
    y = torch.full((3, 3), 2.0)
    out = s.add_data("x", y)
    assert s.get_mask("x") is mask and s.get_data("x") is y
    assert s.data_groups["x"] == {"level": 0.5}
    assert torch.equal(out, y * mask)
    s.add_data("x", y, level=0.9)
    assert s.data_groups["x"] == {"level": 0.9}
    fresh = s.add_data("x", torch.ones(3, 3), reuse_mask=False)
    assert bool(s.get_mask("x").all()) and torch.equal(fresh, torch.ones(3, 3))


def test_readd_with_other_shape_is_a_clear_error_and_changes_nothing():
    s = ZeroFirst()
    x = torch.ones(3, 3)
    s.add_data("x", x)
    s.step()
    with pytest.raises(ValueError, match=r"reuse_mask=False"):
        s.add_data("x", torch.ones(4, 4))
    assert s.get_data("x") is x
    ref = RefZeroFirst()
    _quiet(ref.add_data, "x", torch.ones(3, 3))
    with pytest.raises(AssertionError):  # the reference's error type for the same mistake
        _quiet(ref.add_data, "x", torch.ones(4, 4))
    s.add_data("x", torch.ones(4, 4), reuse_mask=False)
    assert s.get_mask("x").shape == (4, 4)


def test_readd_after_squash_reuses_mask():
    s = ZeroFirst()
    s.add_data("x", torch.ones(3, 3))
    s.step()
    s.squash_mask()
    out = s.add_data("x", torch.ones(3, 3))  # the reference raises here
    assert out[0].sum() == 0
    s.step()


@pytest.mark.parametrize(
    "name,data,error",
    [
        ("a.b", torch.ones(2), KeyError),  # the reference's type (ours is also a ValueError)
        ("a.b", torch.ones(2), ValueError),
        ("", torch.ones(2), ValueError),
        (3, torch.ones(2), TypeError),
        ("x", [1.0, 2.0], TypeError),
        ("x", nn.Linear(2, 2), TypeError),
    ],
)
def test_bad_names_and_types_register_nothing(name, data, error):
    s = ZeroFirst()
    with pytest.raises(error) as info:
        s.add_data(name, data)
    assert not isinstance(info.value, AssertionError)
    assert str(info.value)[0] != "'"  # a readable message, not a KeyError repr
    assert not s.data_groups and not s.state


def test_reference_rejects_the_same_inputs():
    ref = RefZeroFirst()
    with pytest.raises(KeyError):
        _quiet(ref.add_data, "a.b", torch.ones(2))
    with pytest.raises(AssertionError):
        _quiet(ref.add_data, "x", nn.Linear(2, 2))


def test_unknown_names():
    s = ZeroFirst()
    for call in (lambda: s.get_mask("nope"), lambda: s.get_data("nope")):
        with pytest.raises(ValueError, match="does not exist"):  # ValueError as the reference
            call()
    with pytest.raises(ValueError):
        RefZeroFirst().get_mask("nope")


def test_data_list_and_defaults_like_reference():
    data_list = [("t1", torch.randn(3, 3)), ("t2", torch.randn(4, 4))]
    ours = ZeroFirst(data_list=data_list, level=0.7)
    ref = _quiet(RefZeroFirst, data_list=data_list, level=0.7)
    assert ours.data_groups == dict(ref.data_groups) and ours.defaults == ref.defaults
    with pytest.raises(TypeError, match="list"):
        ZeroFirst(data_list={"a": torch.ones(2)})


def test_subclass_written_for_reference_gets_bool_masks():
    s = LikeReferenceSubclass(threshold=0.5)
    s.add_data("x", torch.tensor([0.1, 0.9, -2.0]))
    s.step()
    assert s.get_mask("x").dtype == torch.bool
    assert s.get_mask("x").tolist() == [False, True, True]


def test_enable_mask_update():
    s = ZeroFirst()
    s.add_data("x", torch.ones(2, 2))
    s.enable_mask_update = False
    s.step()
    assert bool(s.get_mask("x").all())


# ---- state_dict and pickling ---------------------------------------------------------------------


def _filled():
    s = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    s.add_data("a", torch.randn(6, 10))
    s.add_data("emb", nn.EmbeddingBag(7, 4), sparsity_level=0.25)
    s.add_data("v", torch.randn(9))
    s.step()
    return s


def test_state_dict_is_compact_and_round_trips_strict():
    s = _filled()
    sd = s.state_dict()
    assert sd["state"]["a"]["mask"].dtype == torch.uint8 and sd["state"]["a"]["mask"].numel() == 8  # 60 bits
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = fxd.DataNormSparsifier()
    fresh.add_data("other", torch.randn(2, 2))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert set(fresh.data_groups) == {"a", "emb", "v"}  # strict: exactly the loaded entries
    for name in ("a", "emb", "v"):
        assert torch.equal(fresh.get_mask(name), s.get_mask(name))
        assert torch.equal(fresh.get_data(name), s.get_data(name))
        assert fresh.data_groups[name] == s.data_groups[name]
    assert fresh.get_data("a").data_ptr() != s.get_data("a").data_ptr()  # the loaded data is a copy
    fresh.step()
    assert torch.equal(fresh.get_mask("a"), s.get_mask("a"))


def test_state_dict_non_strict_keeps_current_entries():
    s = _filled()
    other = fxd.DataNormSparsifier()
    mine = torch.randn(3, 4)
    other.add_data("mine", mine)
    other.add_data("a", torch.randn(2, 2))
    other.load_state_dict(s.state_dict(), strict=False)
    assert set(other.data_groups) == {"mine", "a", "emb", "v"}
    assert other.get_data("mine") is mine and other.get_mask("a").shape == (2, 2)
    assert torch.equal(other.get_mask("emb"), s.get_mask("emb"))


def test_state_dict_squashed_entries_round_trip():
    s = _filled()
    s.squash_mask(names=["a"])
    fresh = fxd.DataNormSparsifier()
    fresh.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="squashed"):
        fresh.get_data("a")
    torch.testing.assert_close(fresh.get_data("a", return_original=False), s.get_data("a", return_original=False))


def test_load_reference_state_dict():
    data = torch.randn(8, 8)
    ref = RefDataNormSparsifier(sparsity_level=0.5)
    _quiet(ref.add_data, "a", data)
    _quiet(ref.add_data, "v", torch.randn(12))
    ref.step()
    ours = fxd.DataNormSparsifier()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.get_mask("a"), ref.get_mask("a").bool())
    assert ours.get_mask("v").shape == (12,)
    assert torch.equal(ours.get_data("a"), data)


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda sd: sd.pop("state"), KeyError),
        (lambda sd: sd["data_groups"].pop("a"), KeyError),
        (lambda sd: sd["_container"].pop("a"), KeyError),
        (lambda sd: sd["state"]["a"].update(mask_shape=(3, 3)), ValueError),
        (lambda sd: sd["data_groups"]["a"].update(sparsity_level=7.0), ValueError),
    ],
)
def test_bad_state_dict_changes_nothing(mutate, error):
    s = _filled()
    sd = s.state_dict()
    mutate(sd)
    target = fxd.DataNormSparsifier()
    keep = torch.randn(2, 2)
    target.add_data("keep", keep)
    with pytest.raises(error):
        target.load_state_dict(sd)
    assert list(target.data_groups) == ["keep"] and target.get_data("keep") is keep


def test_pickle_and_deepcopy_keep_everything():
    s = _filled()
    s2 = fxd.DataNormSparsifier(norm="L2", sparsity_level=0.3)
    s2.add_data("a", torch.randn(4, 4))
    s2.step()
    for original in (s, s2):
        for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
            assert type(clone) is type(original) and clone.norm == original.norm
            for name in original.data_groups:
                assert torch.equal(clone.get_mask(name), original.get_mask(name))
                assert torch.equal(clone.get_data(name), original.get_data(name))
            clone.step()  # the reference's unpickled DataNormSparsifier lost its `norm` and cannot step
            for name in original.data_groups:
                assert torch.equal(clone.get_mask(name), original.get_mask(name))


def test_pickle_is_compact():
    s = fxd.DataNormSparsifier()
    s.add_data("a", torch.zeros(256, 256))
    assert len(pickle.dumps(s)) < 256 * 256 * 4 + 256 * 256 // 8 + 4096


def test_repr_lists_groups():
    text = repr(_filled())
    assert "DataNormSparsifier" in text and "name: emb" in text and "sparsity_level: 0.25" in text
