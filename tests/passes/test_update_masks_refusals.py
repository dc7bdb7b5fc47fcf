"""step() refuses what would be a silent wrong mask: NaN scores or statistics, soft / NaN / wrong-shaped /
``None`` masks from user methods and callables; a refused step changes nothing, randomness included."""

from __future__ import annotations

import math

import pytest
import torch

import fx_sparsify as fxs

from models import MLP

X = torch.randn(4, 16)
pytestmark = pytest.mark.usefixtures("clean_registry")  # the methods these tests register do not outlive them


def _masks(sgm: fxs.SparseGraphModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sgm.masks().items() if isinstance(v, torch.Tensor)}


def _unchanged(sgm: fxs.SparseGraphModule, before: dict[str, torch.Tensor], steps: int) -> None:
    after = _masks(sgm)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sgm._fxs.steps == steps


@pytest.mark.parametrize(
    "rule",
    [
        {"method": "l1_unstructured", "sparsity": 0.5},
        {"method": "topk", "sparsity": 0.5},
        {"method": "ln_structured", "sparsity": 0.5, "dim": 0},
        {"method": "block", "sparsity": 0.5, "block_shape": [1, 4]},
    ],
)
def test_nan_weight_is_refused_at_step_naming_the_target(rule: dict) -> None:
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[0, :3] = math.nan
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **rule}, {"target": "fc2", **rule}]})
    before = _masks(sgm)
    with pytest.raises(ValueError, match=r"target 'fc2.weight'.*3 NaN"):
        sgm.step()
    _unchanged(sgm, before, 0)  # fc1 was computed, not written


def test_nan_in_a_global_rule_names_the_rule() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[1, 1] = math.nan
    sgm = fxs.sparsify_graph(
        model, {"global": [{"targets": ["fc1", "fc2"], "method": "l1_unstructured", "sparsity": 0.5}]}
    )
    with pytest.raises(ValueError, match=r"global rule over 'fc1.weight', 'fc2.weight'.*NaN"):
        sgm.step()


def test_nan_calibration_batch_is_refused_for_activation_statistics_and_wanda() -> None:
    spec = {
        "weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"}],
        "activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}],
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    sgm(X)
    bad = X.clone()
    bad[0, 0] = math.nan
    sgm(bad)
    before = _masks(sgm)
    with pytest.raises(ValueError, match=r"target '(fc1.weight|fc2:input)'.*NaN"):
        sgm.step()
    _unchanged(sgm, before, 0)


@pytest.mark.parametrize(
    "value,match",
    [
        (lambda t: torch.full_like(t, 0.5), "other than 0 and 1"),
        (lambda t: torch.full_like(t, math.nan), "other than 0 and 1"),
        (lambda t: torch.ones(3), "shape"),
        (lambda t: None, "NoneType"),
    ],
)
def test_registered_method_returning_a_bad_mask_is_refused_at_step(value, match: str) -> None:
    name = f"bad_mask_{match.split()[0]}"

    @fxs.register_mask_method(name, override=True)
    def bad(tensor: torch.Tensor) -> torch.Tensor:
        return value(tensor)

    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5},
                {"target": "fc2", "method": name},
            ]
        },
    )
    before = _masks(sgm)
    with pytest.raises((ValueError, TypeError), match=rf"target 'fc2.weight'.*{match}"):
        sgm.step()
    _unchanged(sgm, before, 0)


def test_registered_method_returning_0_1_floats_is_accepted() -> None:
    @fxs.register_mask_method("float_half", override=True)
    def half(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.abs() > tensor.abs().median()).float()

    assert fxs.compute_mask("float_half", torch.tensor([1.0, 2.0, 3.0])).dtype == torch.bool


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda stat, **kw: torch.full_like(stat, 0.5), "other than 0 and 1"),
        (lambda stat, **kw: torch.full_like(stat, math.nan), "other than 0 and 1"),
        (lambda stat, **kw: torch.ones(stat.numel() + 1), "shape"),
        (lambda stat, **kw: None, "NoneType"),
    ],
)
def test_activation_mask_callable_returning_a_bad_mask_is_refused(fn, match: str) -> None:
    sgm = fxs.sparsify_graph(MLP(), {"activations": [{"target": "fc2", "mask": fn}]})
    sgm(X)
    with pytest.raises((ValueError, TypeError), match=rf"target 'fc2:input'.*{match}"):
        sgm.step()
    assert sgm.masks()["fc2:input"].shape == ()  # still the all-keep scalar of before the first step
    assert sgm.fc2_input_observer.batches == 1  # statistics not restarted


def test_failed_step_does_not_consume_randomness() -> None:
    @fxs.register_mask_method("fails_once", override=True)
    def fails(tensor: torch.Tensor) -> torch.Tensor:
        if calls.pop():
            raise ValueError("boom")
        return torch.ones_like(tensor, dtype=torch.bool)

    spec = {
        "weights": [
            {"target": "fc1", "method": "bernoulli", "density": 0.5, "gradient": "supermask"},
            {"target": "fc2", "method": "random_unstructured", "sparsity": 0.5, "gradient": "supermask"},
            {"target": "head", "method": "fails_once"},
        ]
    }
    model = MLP()
    calls = [False, True]  # popped from the end: the first step fails, the second works
    sgm = fxs.sparsify_graph(model, spec)
    sgm.train()
    with pytest.raises(ValueError, match="target 'head.weight': boom"):
        sgm.step()
    sgm.step()
    calls = [False]
    fresh = fxs.sparsify_graph(model, spec)
    fresh.train()
    fresh.step()
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.equal(sgm.masks()[name], fresh.masks()[name])
