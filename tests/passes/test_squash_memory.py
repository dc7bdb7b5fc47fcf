"""Squash allocates only for masked weights (SPEC §15): everything else is shared with the sparse module."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

from models import MLP

X = torch.randn(6, 16)
SPEC: dict[str, Any] = {
    "weights": [
        {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.25},
    ]
}


def _ptrs(module: nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def _values(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_squash_shares_unmasked_tensors_and_leaves_the_sparse_module_unchanged(capture: str) -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC, capture=capture, example_inputs=(X,))
    sgm.step()
    before, graph_before = _values(sgm), str(sgm.graph)
    expected = sgm(X)
    out = sgm.squash()
    shared, own = _ptrs(sgm), _ptrs(out)
    for key in ("fc1.bias", "fc2.bias", "head.weight", "head.bias"):
        assert own[key] == shared[key], key  # not copied
    for key in ("fc1.weight", "fc2.weight"):
        assert own[key] != shared[key], key  # a new masked tensor
    torch.testing.assert_close(out(X), expected, rtol=0, atol=0)
    # the sparse module is unchanged: values, graph, masks, and it still runs and steps
    after = _values(sgm)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert str(sgm.graph) == graph_before
    torch.testing.assert_close(sgm(X), expected, rtol=0, atol=0)
    sgm.step()
    # the squashed module's own tensors are independent: changing them leaves the sparse module alone
    with torch.no_grad():
        out.get_parameter("fc1.weight").add_(1.0)
    torch.testing.assert_close(sgm(X), expected, rtol=0, atol=0)


def test_squash_does_not_share_modules_with_the_sparse_module() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    out = sgm.squash()
    mine = {id(m) for m in sgm.modules()}
    assert not any(id(m) in mine for m in out.modules())
    out.train()
    sgm.eval()
    assert out.head.training and not sgm.head.training


def test_pruned_entries_are_positive_zero_after_squash() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.copy_(-model.fc1.weight.abs() - 0.01)  # every weight negative
    sgm = fxs.sparsify_graph(model, SPEC)
    sgm.step()
    w = sgm.squash().get_parameter("fc1.weight")
    pruned = ~sgm.masks()["fc1.weight"]
    assert pruned.any() and (w[pruned] == 0).all() and not w[pruned].signbit().any()


def test_inplace_mode_squash_copies_no_weight_at_all() -> None:
    spec = {**SPEC, "mode": "inplace"}
    model = MLP()
    sgm = fxs.sparsify_graph(model, spec, inplace=True)
    sgm.step()
    expected = sgm(X)
    out = sgm.squash()
    assert _ptrs(out) == {k: v for k, v in _ptrs(sgm).items() if k in _ptrs(out)}
    assert out.fc1.weight is model.fc1.weight  # the user's own (already masked) parameter
    torch.testing.assert_close(out(X), expected, rtol=0, atol=0)


def test_inplace_graph_mode_squash_reuses_the_weights_and_keeps_the_sparse_outputs() -> None:
    """inplace=True: squash zeroes the pruned weights in place (the sparse module gives up their old
    values; its outputs, masks and later steps are the same)."""
    model = MLP()
    sgm = fxs.sparsify_graph(model, SPEC, inplace=True)
    sgm.step()
    expected, masks = sgm(X), sgm.masks()
    reference = copy.deepcopy(sgm)
    out = sgm.squash()
    assert out.fc1.weight is model.fc1.weight and out.fc2.weight is model.fc2.weight
    torch.testing.assert_close(out(X), expected, rtol=0, atol=0)
    torch.testing.assert_close(sgm(X), expected, rtol=0, atol=0)
    assert all(torch.equal(sgm.masks()[k], m) for k, m in masks.items())
    sgm.step()
    reference.step()
    assert all(torch.equal(sgm.masks()[k], m) for k, m in reference.masks().items())


def test_inplace_squash_copies_weights_whose_pruned_values_may_still_matter() -> None:
    """``"gradient": "ste"`` (regrowth) keeps its pruned values: squash copies that weight even in place."""
    spec = {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "gradient": "ste"}]}
    model = MLP()
    original = model.fc1.weight.detach().clone()
    sgm = fxs.sparsify_graph(model, spec, inplace=True)
    sgm.step()
    out = sgm.squash()
    assert out.fc1.weight is not model.fc1.weight
    assert torch.equal(model.fc1.weight.detach(), original)


def test_activation_fold_writes_a_new_weight() -> None:
    spec = {
        "activations": [
            {
                "target": "fc2",
                "mask": "threshold",
                "threshold": 0.2,
                "reduce": "mean",
                "aggregate": "abs_sum",
                "features": None,
                "feature_dim": None,
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    for _ in range(3):
        sgm(torch.randn(6, 16))
    sgm.step()
    before = sgm.fc2.weight.detach().clone()
    expected = sgm(X)
    out = sgm.squash()
    assert "folded" in sgm.report()
    assert torch.equal(sgm.fc2.weight.detach(), before)
    torch.testing.assert_close(out(X), expected)
