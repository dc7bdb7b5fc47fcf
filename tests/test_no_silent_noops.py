"""No silent no-ops: a squash that would return the unpruned model warns, ``shrink=True`` without a
``channels`` rule says so, and every warning points at the user's own line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


def _sgm(spec: dict = SPEC) -> fxs.SparseGraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return fxs.sparsify_graph(model, spec, example_inputs=(torch.randn(2, 8),))


def test_squash_before_any_step_warns_once_at_the_callers_line() -> None:
    sgm = _sgm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sgm.squash()
        sgm.squash()  # once per module
    hits = [w for w in caught if "before any step()" in str(w.message)]
    assert len(hits) == 1 and "squash()" in str(hits[0].message) and "sgm.step()" in str(hits[0].message)
    assert hits[0].filename == __file__  # stacklevel: the user's call, not our method


def test_squash_after_step_or_with_initial_masks_is_quiet() -> None:
    sgm = _sgm()
    sgm.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sgm.squash()
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[0] = False  # initial masks already prune: the squash is not a no-op
    torch.manual_seed(0)
    seeded = fxs.sparsify_graph(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
        SPEC,
        example_inputs=(torch.randn(2, 8),),
        masks={"0.weight": keep},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seeded.squash()


def test_squash_into_before_step_warns_too() -> None:
    sgm = _sgm()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"squash_into\(\) before any step") as record:
        sgm.squash_into(model)
    assert record[0].filename == __file__


def test_shrink_without_channels_rule_is_a_plain_squash_with_a_note() -> None:
    """As the user hit it: ``squash(shrink=True)`` on a weights-only spec raised a bare KeyError: 'channels'."""
    sgm = _sgm()
    x = torch.randn(3, 8)
    sgm(x)
    sgm.step()
    with pytest.warns(UserWarning, match=r"squash\(shrink=True\): the spec has no 'channels' rule") as record:
        small = sgm.squash(shrink=True)
    assert record[0].filename == __file__
    plain = sgm.squash()
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    torch.testing.assert_close(small(x), sgm(x))
    with pytest.warns(UserWarning, match=r"squash_into\(model, shrink=True\): the spec has no 'channels'"):
        model = sgm.squash_into(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), shrink=True)
    torch.testing.assert_close(model(x), sgm(x))


def test_repr_names_the_sparse_module() -> None:
    sgm = _sgm()
    text = repr(sgm)
    assert text.startswith("SparseGraphModule(Sequential, capture=fx, 2 targets, steps=0)")
    sgm.step()
    assert "steps=1" in repr(sgm)


def test_save_compressed_of_a_sparse_module_names_the_call_to_make(tmp_path) -> None:
    """As the user hit it: save_compressed(sgm) wrote the unpruned weights plus the masks, without a word."""
    sgm = _sgm()
    sgm.step()
    with pytest.raises(ValueError, match=r"save_compressed\(sgm.squash\(\), path\)"):
        fxs.save_compressed(sgm, tmp_path / "sgm.safetensors")
    assert not (tmp_path / "sgm.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxs.save_compressed(sgm.state_dict(), tmp_path / "state.safetensors")  # the resumable form, said so
        fxs.save_compressed(sgm.squash(), tmp_path / "m.safetensors")  # the pruned model
    loaded = fxs.load_compressed(tmp_path / "m.safetensors")
    assert float((loaded["0.weight"] == 0).float().mean()) == 0.5


def test_a_compressed_checkpoint_gets_the_usual_file_mode(tmp_path) -> None:
    """model.safetensors came out 0600 (safetensors' own temporary file), unlike every other file the user writes."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        fxs.save_compressed({"w": torch.zeros(4, 4)}, tmp_path / "m.safetensors")
        fxs.save_compressed({"w": torch.zeros(4, 4)}, tmp_path / "z.safetensors", zstd=3)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "z.safetensors").stat().st_mode) == 0o644


def test_the_function_forms_warn_at_the_callers_line_too() -> None:
    """fxs.squash(sgm) goes through api.py: the warning still names this file, not ours."""
    sgm = _sgm()
    with pytest.warns(UserWarning, match="before any step") as record:
        fxs.squash(sgm)
    assert record[0].filename == __file__
