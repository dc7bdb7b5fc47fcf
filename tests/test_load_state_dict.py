"""load_state_dict of a SparseGraphModule is validated first and atomic: a dict that cannot load
changes nothing (weights, masks, observer statistics, step count)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.observer import ActivationObserver

from models import MLP

SPEC = {
    "weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}],
    "activations": [
        {"target": "fc2", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.5}
    ],
}
X = torch.randn(4, 16)


def _trained(model: MLP, spec: dict = SPEC) -> fxs.SparseGraphModule:
    sgm = fxs.sparsify_graph(model, spec)
    sgm(X)
    sgm.step()
    sgm(X)  # statistics pending for the next step
    return sgm


def _snapshot(sgm: fxs.SparseGraphModule) -> dict:
    return {
        "sd": {k: v.clone() for k, v in sgm.state_dict().items() if isinstance(v, torch.Tensor)},
        "steps": sgm._fxs.steps,
        "obs": (sgm.fc2_input_observer.samples, sgm.fc2_input_observer.batches),
        "shape": sgm._fxs.targets["fc2:input"].shape,
    }


def _assert_same(sgm: fxs.SparseGraphModule, before: dict) -> None:
    after = _snapshot(sgm)
    assert after["sd"].keys() == before["sd"].keys()
    for k, v in before["sd"].items():
        assert after["sd"][k].shape == v.shape and torch.equal(after["sd"][k], v), k
    assert (after["steps"], after["obs"], after["shape"]) == (before["steps"], before["obs"], before["shape"])


def test_round_trip_still_loads_exactly() -> None:
    model = MLP()
    sgm = _trained(model)
    fresh = fxs.sparsify_graph(model, SPEC)
    fresh.load_state_dict(sgm.state_dict())
    assert all(torch.equal(fresh.masks()[k], v) for k, v in sgm.masks().items())
    assert fresh._fxs.steps == 1 and fresh.fc2_input_observer.batches == 1


def test_dict_of_another_spec_raises_before_anything_is_written() -> None:
    model = MLP()
    sgm = _trained(model)
    before = _snapshot(sgm)
    other = _trained(
        MLP(),
        {
            "weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5}],
            "activations": [{"target": "head", "mask": "l1_unstructured", "sparsity": 0.5, "aggregate": "abs_sum"}],
        },
    ).state_dict()
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*missing keys.*unexpected keys") as info:
        sgm.load_state_dict(other)
    assert isinstance(info.value, RuntimeError)  # what torch's own load_state_dict raises
    _assert_same(sgm, before)


def test_dict_of_another_model_shape_mismatch_raises_before_writing() -> None:
    sgm = _trained(MLP())
    before = _snapshot(sgm)
    other = _trained(MLP(hidden=24)).state_dict()
    with pytest.raises(ValueError, match=r"'fc1.weight' has shape \(24, 16\)"):
        sgm.load_state_dict(other)
    _assert_same(sgm, before)
    with pytest.raises(ValueError, match="shape"):
        sgm.load_state_dict(other, strict=False)  # shapes are checked in either mode
    _assert_same(sgm, before)


@pytest.mark.parametrize("bad", [0.5, math.nan, 2.0])
@pytest.mark.parametrize("which", ["fc1_weight_mask", "fc2_input_mask"])
def test_soft_or_nan_masks_are_refused(bad: float, which: str) -> None:
    sgm = _trained(MLP())
    before = _snapshot(sgm)
    sd = sgm.state_dict()
    key = next(k for k in sd if k.replace(".", "_") == which or k == which)
    sd[key] = sd[key].float().clone()
    sd[key].view(-1)[0] = bad
    sd["fc1.weight"] = torch.zeros_like(sd["fc1.weight"])  # would be written first without the check
    with pytest.raises(ValueError, match=rf"mask '{key}' holds values other than 0 and 1"):
        sgm.load_state_dict(sd)
    _assert_same(sgm, before)


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"steps": "x"}, r"'steps' must be an int >= 0, got str"),
        ({"steps": -1}, r"'steps' must be an int >= 0"),
        ({}, r"missing 'steps'"),
        ("3", r"expected a dict"),
    ],
)
def test_bad_step_count_is_a_clear_error(extra: object, match: str) -> None:
    sgm = _trained(MLP())
    before = _snapshot(sgm)
    sd = sgm.state_dict()
    sd["_extra_state"] = extra
    sd["fc1.weight"] = torch.zeros_like(sd["fc1.weight"])
    with pytest.raises(ValueError, match=match):
        sgm.load_state_dict(sd)
    _assert_same(sgm, before)
    with pytest.raises(ValueError, match=match):
        sgm.set_extra_state(extra)


def test_bad_observer_counts_are_refused_before_writing() -> None:
    sgm = _trained(MLP())
    before = _snapshot(sgm)
    sd = sgm.state_dict()
    sd["fc2_input_observer._extra_state"] = {"samples": 1.5, "batches": 1}
    with pytest.raises(ValueError, match=r"observer 'fc2_input_observer'.*'samples' must be an int"):
        sgm.load_state_dict(sd)
    _assert_same(sgm, before)
    with pytest.raises(ValueError, match="'batches' must be an int"):
        ActivationObserver().set_extra_state({"samples": 1, "batches": "two"})


def test_non_strict_load_of_a_partial_dict_still_works() -> None:
    model = MLP()
    sgm = _trained(model)
    fresh = fxs.sparsify_graph(model, SPEC)
    partial = {k: v for k, v in sgm.state_dict().items() if k in ("fc1.weight", "fc1_weight_mask")}
    fresh.load_state_dict(partial, strict=False)
    assert torch.equal(fresh.masks()["fc1.weight"], sgm.masks()["fc1.weight"])


def test_inside_a_parent_module_the_prefix_is_respected() -> None:
    model = MLP()
    sgm = _trained(model)
    parent = torch.nn.Sequential(fxs.sparsify_graph(model, SPEC))
    parent.load_state_dict({f"0.{k}": v for k, v in sgm.state_dict().items()})
    assert torch.equal(parent[0].masks()["fc1.weight"], sgm.masks()["fc1.weight"])
    bad = {f"0.{k}": v for k, v in sgm.state_dict().items()}
    bad["0._extra_state"] = {"steps": "x"}
    before = copy.deepcopy(parent[0].state_dict())
    with pytest.raises(ValueError, match="'steps' must be an int"):
        parent.load_state_dict(bad)
    assert all(torch.equal(v, parent[0].state_dict()[k]) for k, v in before.items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_an_activation_mask_of_another_dtype_loads_in_the_modules_dtype(dtype: torch.dtype) -> None:
    """A fresh module adopts the saved activation mask's shape, but not its dtype: a float64 mask turned the layer's
    input float64 and the forward failed inside torch ('mat1 and mat2 must have the same dtype')."""
    torch.manual_seed(0)
    source = _trained(MLP())
    state = {k: v.to(dtype) if k == "fc2_input_mask" else v for k, v in source.state_dict().items()}
    torch.manual_seed(1)
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.load_state_dict(state)
    assert sgm.get_buffer("fc2_input_mask").dtype == source.get_buffer("fc2_input_mask").dtype
    with torch.no_grad():
        assert torch.equal(sgm(X), source(X))


@pytest.mark.parametrize("key", ["fc2_input_mask", "fc1_weight_mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_assign_true_keeps_the_masks_dtype(key: str, dtype: torch.dtype) -> None:
    """``load_state_dict(..., assign=True)`` takes the dict's tensors themselves: a mask of another dtype was taken
    as it was (a float64 mask made the layer's input or weight float64, and the forward failed inside torch)."""
    torch.manual_seed(0)
    source = _trained(MLP())
    state = {k: v.to(dtype) if k == key else v for k, v in source.state_dict().items()}
    torch.manual_seed(1)
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.load_state_dict(state, assign=True)
    assert sgm.get_buffer(key).dtype == source.get_buffer(key).dtype
    with torch.no_grad():
        assert torch.equal(sgm(X), source(X))
