"""Planning of the channel groups that no ``channels`` rule owns (passive column groups, zero-row groups)."""

from __future__ import annotations

import torch

import fx_sparsify as fxs

from _channel_models import MLP

X = torch.randn(16, 20)


def test_a_passive_column_group_that_cannot_be_removed_is_not_planned() -> None:
    """fc1's input columns come from the model input: no group can shrink them, and none is listed (a
    failed group only other rules' zeros could shrink has nothing to say)."""
    model = MLP()
    sgm = fxs.sparsify_graph(
        model, {"activations": [{"target": "fc1", "mask": "l1_unstructured", "sparsity": 0.5}]}, example_inputs=(X,)
    )
    sgm(X)
    sgm.step()
    plan = sgm.shrink_plan()
    assert "fc1.weight" not in plan and "model input" not in plan, plan
    small = sgm.squash(shrink=True)
    assert small.state_dict()["fc1.weight"].shape == (64, 20)


def test_a_passive_column_group_removes_only_the_columns_other_rules_zeroed() -> None:
    """An activation rule on fc2 plans fc2's input columns as a group no channels rule owns: squash(shrink=True)
    removes the channels whose columns the activation mask zeroes, and only those. A producer row that happens
    to be zero (channel 5 of fc1, with a large bias: its constant activation is kept by the mask) is not a
    zero-row group (no rule zeroes rows), so it stays."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[5] = 0.0
        model.fc1.bias[5] = 3.0
    spec = {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(X,))
    sgm(X)
    sgm.step()
    kept = int((sgm.get_buffer("fc2_input_mask") != 0).sum())
    assert kept == 32 and bool(sgm.get_buffer("fc2_input_mask")[5] != 0)
    plan = sgm.shrink_plan()
    assert "64 → 32" in plan and "zero-row" not in plan, plan
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(X), sgm(X), atol=1e-5, rtol=1e-5)
    assert small.state_dict()["fc1.weight"].shape == (kept, 20)
    assert small.state_dict()["fc2.weight"].shape == (48, kept)
