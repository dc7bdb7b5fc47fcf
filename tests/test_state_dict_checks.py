"""load_state_dict of a SparseGraphModule refuses activation masks and observer statistics that cannot fit their
layer (they loaded silently and failed at the next forward), naming the key; soft / NaN masks stay refused and
0 / 1 float masks still load."""

from __future__ import annotations

import math

import pytest
import torch

import fx_sparsify as fxs

from models import MLP

SPEC = {
    "weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"}],
    "activations": [
        {"target": "fc2", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.5}
    ],
}
X = torch.randn(4, 16)


def _trained() -> fxs.SparseGraphModule:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm(X)
    sgm.step()
    sgm(X)
    return sgm


def _key(sd: dict, end: str) -> str:
    return next(k for k in sd if k.endswith(end))


@pytest.mark.parametrize("fresh", [False, True], ids=["stepped", "fresh"])
@pytest.mark.parametrize(
    "which,bad,match",
    [
        ("fc2_input_mask", torch.ones(7, dtype=torch.bool), r"activation mask 'fc2_input_mask' has shape \(7,\)"),
        ("fc2_input_observer.stat", torch.ones(7), r"observer statistic 'fc2_input_observer.stat' has shape \(7,\)"),
        (
            "fc1_input_norm_observer.stat",
            torch.ones(1, 9),
            r"observer statistic 'fc1_input_norm_observer.stat' has shape \(1, 9\)",
        ),
    ],
)
def test_wrong_shapes_of_activation_masks_and_statistics_name_the_key(
    fresh: bool, which: str, bad: torch.Tensor, match: str
) -> None:
    sd = _trained().state_dict()
    key = _key(sd, which)
    sd[key] = bad
    target = fxs.sparsify_graph(MLP(), SPEC) if fresh else _trained()
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())


def test_masks_that_fit_still_load_and_run() -> None:
    sgm = _trained()
    sd = sgm.state_dict()
    sd["fc1_weight_mask"] = sd["fc1_weight_mask"].float()  # 0 / 1 floats load
    sd["fc2_input_mask"] = sd["fc2_input_mask"].float()
    fresh = fxs.sparsify_graph(MLP(), SPEC)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(X), sgm(X))


@pytest.mark.parametrize("bad", [0.5, math.nan])
def test_soft_and_nan_masks_stay_refused(bad: float) -> None:
    sd = _trained().state_dict()
    sd["fc2_input_mask"] = sd["fc2_input_mask"].float()
    sd["fc2_input_mask"][0] = bad
    with pytest.raises(ValueError, match=r"mask 'fc2_input_mask' holds values other than 0 and 1"):
        fxs.sparsify_graph(MLP(), SPEC).load_state_dict(sd)


def test_per_feature_masks_need_one_entry_per_feature() -> None:
    spec = {
        "activations": [
            {
                "target": "fc2",
                "aggregate": "abs_sum",
                "reduce": "mean",
                "mask": "l1_unstructured",
                "sparsity": 0.5,
                "features": [0, 3],
                "feature_dim": 1,
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    sgm(X)
    sgm.step()
    sd = sgm.state_dict()
    fxs.sparsify_graph(MLP(), spec).load_state_dict(sd)
    sd["fc2_input_mask"] = torch.ones(3)
    with pytest.raises(
        ValueError,
        match=r"activation mask 'fc2_input_mask' has shape \(3,\); it needs a leading "
        r"dim of 2",
    ):
        fxs.sparsify_graph(MLP(), spec).load_state_dict(sd)
