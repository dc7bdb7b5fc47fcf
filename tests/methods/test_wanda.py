"""``"scores": "wanda"`` equals the Wanda paper's reference implementation (per output row) on the same inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.methods.wanda import per_row_mask
from tests.models import MLP


class _WrappedGPT:
    """Wanda's ``WrappedGPT`` (locuslab/wanda, lib/layerwrapper.py): running mean of ‖x_j‖² per input feature."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _reference_wanda_mask(
    layer: nn.Linear, wrapped: _WrappedGPT, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Wanda's ``prune_wanda`` mask selection (lib/prune.py); returns our keep-mask (True = kept)."""
    W_metric = torch.abs(layer.weight.data) * torch.sqrt(wrapped.scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1  # True = pruned
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
    return ~W_mask


@pytest.mark.parametrize(
    "rule,n_m",
    [
        ({"method": "l1_unstructured", "sparsity": 0.5}, (0, 0)),
        ({"method": "l1_unstructured", "sparsity": 0.25}, (0, 0)),
        ({"method": "nm", "n": 2, "m": 4}, (2, 4)),
    ],
)
def test_masks_equal_the_reference_implementation(rule: dict, n_m: tuple[int, int]) -> None:
    model = MLP()
    scale = torch.exp(torch.randn(16))
    data = [torch.randn(4, 6, 16) * scale, torch.randn(4, 6, 16) * scale]  # (batch, tokens, features)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **rule, "scores": "wanda"}]})
    wrapped = {name: _WrappedGPT(getattr(model, name)) for name in ("fc1", "fc2", "head")}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, w=w: w.add_batch(i[0].detach()))
        for name, w in wrapped.items()
    ]
    for x in data:
        sgm(x)
        model(x)
    for h in hooks:
        h.remove()
    sgm.step()
    prune_n = n_m[1] - n_m[0] if n_m[0] else 0  # the reference's prune_n counts pruned entries per group
    for name, w in wrapped.items():
        expected = _reference_wanda_mask(getattr(model, name), w, rule.get("sparsity", 0.0), prune_n, n_m[1])
        assert torch.equal(sgm.masks()[f"{name}.weight"], expected), name


def test_every_row_loses_the_same_count() -> None:
    scores = torch.rand(6, 10)
    scores[0] *= 100  # one row of large scores: a whole-tensor ranking would spare it entirely
    keep = per_row_mask("l1_unstructured", scores, {"sparsity": 0.3})
    assert torch.all((~keep).sum(1) == 3)
    assert torch.all(per_row_mask("topk", scores, {"density": 0.4}).sum(1) == 4)
    assert torch.all((~per_row_mask("l1_unstructured", scores, {"sparsity": 12})).sum(1) == 2)
    with pytest.raises(ValueError, match="not a multiple of 6"):
        per_row_mask("l1_unstructured", scores, {"sparsity": 13})
