"""Models made under ``torch.inference_mode()``: their parameters and buffers are inference tensors, which count no
versions (reading ``t._version`` raises). The eval cache of masked weights and the bitmask kernel's check of its
buffers keyed on versions, so every eval forward of such a sparse module, and every forward of a bitmask layer made
there, failed with 'Inference tensors do not track version counter'."""

from __future__ import annotations

import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._bitmask import BitmaskLinear

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 30))


def _masked_reference(sgm: fxs.SparseGraphModule, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ (sgm.get_parameter("0.weight") * sgm.masks()["0.weight"]).T + sgm.get_parameter("0.bias"))
    return h @ (sgm.get_parameter("2.weight") * sgm.masks()["2.weight"]).T + sgm.get_parameter("2.bias")


def test_eval_forwards_of_a_module_made_under_inference_mode_see_each_steps_masks() -> None:
    """Not cached (an in-place mask write would not be seen): each forward masks the weights it reads."""
    x = torch.randn(2, 30)
    with torch.inference_mode():
        rule = {**SPEC["weights"][0], "schedule": {"kind": "linear", "start": 0.25, "end": 0.5, "steps": 2}}
        sgm = fxs.sparsify_graph(_model(), {"weights": [rule]})
        sgm.eval()
        seen = []
        for _ in range(3):
            sgm.step()
            seen.append(sgm.sparsity()["0.weight"])
            torch.testing.assert_close(sgm(x), _masked_reference(sgm, x))
            torch.testing.assert_close(sgm(x), _masked_reference(sgm, x))
    assert seen[0] < seen[1] < seen[2]  # each step wrote new masks in place


def test_a_bitmask_layer_made_under_inference_mode_runs_in_and_outside_it() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 80, generator=g) * (torch.rand(64, 80, generator=g) < 0.5)
    b = torch.randn(64, generator=g)
    x = torch.randn(3, 80, generator=g)
    with torch.inference_mode():
        layer = BitmaskLinear(w, b)
        torch.testing.assert_close(layer(x), x @ w.T + b)
        small = fxs.sparsify_graph(_model(), SPEC)
        small.step()
        squashed = small.squash(storage="bitmask")
        dense = small.squash()
        y = torch.randn(2, 30)
        torch.testing.assert_close(squashed(y), dense(y))
    torch.testing.assert_close(layer(x), x @ w.T + b)
