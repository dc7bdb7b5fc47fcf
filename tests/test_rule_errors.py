"""Bad rule values that pass a glance are errors naming the rule: a ``scores`` callable returning None (at
step()), activation ``features`` / ``feature_dim`` outside the input (at the first forward, before any index
error), a ``block_shape`` with a huge int (when the spec is built, not an overflow at step())."""

from __future__ import annotations

import pytest
import torch

import fx_sparsify as fxs

from models import MLP

X = torch.randn(4, 16)


def test_a_scores_callable_returning_none_names_the_target() -> None:
    sgm = fxs.sparsify_graph(
        MLP(), {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "scores": lambda w: None}]}
    )
    with pytest.raises(TypeError, match=r"'fc1.weight'.*scores callable .* returned None; it must return a tensor"):
        sgm.step()


@pytest.mark.parametrize(
    "features,dim,match",
    [
        ([0, 40], 1, r"features \[40\] are outside the 32 entries of dim 1"),
        ([-40], 1, r"features \[-40\] are outside the 32 entries of dim 1"),
        ([0], 5, r"feature_dim 5 is outside the 2-D input"),
    ],
)
def test_activation_features_out_of_range_name_the_rule(features: list[int], dim: int, match: str) -> None:
    spec = {
        "activations": [
            {
                "target": "fc2",
                "aggregate": "abs_sum",
                "reduce": "mean",
                "mask": "l1_unstructured",
                "sparsity": 0.5,
                "features": features,
                "feature_dim": dim,
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    with pytest.raises(ValueError, match=r"activation rule on 'fc2'.*" + match):
        sgm(X)


@pytest.mark.parametrize("block", [(1, 2**70), [2**63, 4], 2**80])
def test_a_huge_block_shape_is_refused_when_the_spec_is_built(block: object) -> None:
    rule = {"target": "fc1", "method": "block", "sparsity": 0.5, "block_shape": block}
    with pytest.raises(
        ValueError, match=r"weights rule 'fc1': block: block_shape .* has a size larger than 2\*\*31 - 1"
    ):
        fxs.SparsitySpec.from_dict({"weights": [rule]})
