from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.select import resolve_weight_targets

from helpers import assert_unchanged, snapshot
from models import MLP, SmallCNN, TiedLM

FULL = {
    "seed": 3,
    "weights": [
        {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "re:fc\\d", "method": "l1_unstructured", "sparsity": 0.25, "regrow": True},
        {"target": "head.weight", "method": "dense"},
    ],
    "global": [{"targets": ["fc1", "fc2"], "method": "l1_unstructured", "sparsity": 0.6}],
    "activations": [
        {
            "target": "fc2",
            "aggregate": "sum",
            "reduce": "mean",
            "mask": "l1_unstructured",
            "sparsity": 0.5,
            "features": None,
            "feature_dim": None,
        }
    ],
}


def test_round_trip_through_json() -> None:
    spec = fxs.SparsitySpec.from_dict(FULL)
    again = fxs.SparsitySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.weights[1].regrow is True and spec.global_[0].targets == ("fc1", "fc2")


def test_rule_dataclasses_round_trip() -> None:
    for rule in fxs.SparsitySpec.from_dict(FULL).weights:
        assert fxs.WeightRule.from_dict(rule.to_dict()) == rule
    act = fxs.ActivationRule(target="fc2", features=[0, 2], feature_dim=1, mask="threshold", options={"threshold": 0.1})
    assert fxs.ActivationRule.from_dict(act.to_dict()) == act


def test_shorthand_method_strings_resolve() -> None:
    rule = fxs.WeightRule.from_dict({"target": "fc1", "method": "TOPK{0.3}(U)"})
    assert rule.method == "topk" and rule.options == {"density": 0.3} and rule.gradient == "ste"
    assert fxs.WeightRule.from_dict({"target": "fc1", "method": "2:4"}).options == {"n": 2, "m": 4}


def test_last_rule_wins_and_dense_excludes() -> None:
    spec = fxs.SparsitySpec.from_dict(
        {
            "weights": [
                {"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5},
                {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.9},
                {"target": "head", "method": "dense"},
            ]
        }
    )
    targets = resolve_weight_targets(spec, MLP())
    assert list(targets) == ["fc1.weight", "fc2.weight"]
    assert targets["fc2.weight"].rule.options["sparsity"] == 0.9


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("fc1", ["fc1.weight"]),
        ("fc1.bias", ["fc1.bias"]),
        ("fc*", ["fc1.weight", "fc2.weight"]),  # a glob selects weights: biases only when it names them
        ("fc*.bias", ["fc1.bias", "fc2.bias"]),
        ("re:fc\\d", ["fc1.weight", "fc2.weight"]),
        ("type:Linear", ["fc1.weight", "fc2.weight", "head.weight"]),
    ],
)
def test_selectors(selector: str, expected: list[str]) -> None:
    spec = fxs.SparsitySpec.from_dict({"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.1}]})
    assert sorted(resolve_weight_targets(spec, MLP())) == sorted(set(expected))


def test_type_selector_reaches_nested_depthwise_convs() -> None:
    spec = fxs.SparsitySpec.from_dict(
        {"weights": [{"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.1}]}
    )
    assert "blocks.1.dw.weight" in resolve_weight_targets(spec, SmallCNN())


def test_tied_alias_selects_the_canonical_tensor() -> None:
    spec = fxs.SparsitySpec.from_dict(
        {"weights": [{"target": "head.weight", "method": "l1_unstructured", "sparsity": 0.1}]}
    )
    assert list(resolve_weight_targets(spec, TiedLM())) == ["emb.weight"]


@pytest.mark.parametrize(
    "spec, exc, match",
    [
        (
            {"weights": [{"target": "fc3", "method": "l1_unstructured", "sparsity": 0.5}]},
            ValueError,
            "closest names: .*fc1",
        ),
        (
            {"weights": [{"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5}]},
            ValueError,
            "no module of type 'Conv2d'",
        ),
        (
            {"weights": [{"target": "re:(", "method": "l1_unstructured", "sparsity": 0.5}]},
            ValueError,
            "not a valid regular expression",
        ),
        (
            {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsty": 0.5}]},
            TypeError,
            "did you mean 'sparsity'",
        ),
        (
            {"weights": [{"target": "fc1", "method": "l1_unstructred", "sparsity": 0.5}]},
            KeyError,
            "Did you mean 'l1_unstructured'",
        ),
        ({"weights": [{"target": "fc1", "method": "l1_unstructured"}]}, TypeError, "needs option"),
        (
            {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 1.5}]},
            ValueError,
            r"weights rule .fc1.*sparsity=1.5.*must be in \[0, 1\]",
        ),
        ({"weights": [{"target": "fc1", "method": "topk", "density": -0.1}]}, ValueError, "density"),
        ({"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": -3}]}, ValueError, "count"),
        ({"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": "half"}]}, TypeError, "float in"),
        ({"weights": [{"method": "l1_unstructured", "sparsity": 0.5}]}, KeyError, "missing 'target'"),
        (
            {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "gradient": "nope"}]},
            ValueError,
            "gradient",
        ),
        ({"weights": {"target": "fc1"}}, TypeError, "list of rule dicts"),
        ({"weights": ["fc1"]}, TypeError, "each rule is a dict"),
        ({"wieghts": []}, KeyError, "unknown key"),
        ({}, ValueError, "no rules"),
        ({"seed": "0", "weights": [{"target": "fc1", "method": "dense"}]}, TypeError, "seed"),
        ({"mode": "fast", "weights": [{"target": "fc1", "method": "dense"}]}, ValueError, "mode"),
        ({"global": [{"targets": "fc1", "method": "l1_unstructured", "sparsity": 0.5}]}, TypeError, "targets"),
        ({"weights": [{"target": "fc1", "method": "TOPK{x}"}]}, ValueError, "cannot parse"),
        ({"activations": [{"target": "fc2", "mask": "dense", "features": [0]}]}, ValueError, "go together"),
        ({"activations": [{"target": "fc2", "aggregate": "median"}]}, ValueError, "unknown aggregate"),
        ({"activations": [{"target": "fc2", "reduce": 3}]}, TypeError, "callable"),
        ({"activations": [{"target": "fc2", "mask": "nope"}]}, KeyError, "unknown mask method"),
    ],
)
def test_bad_specs_raise_clear_errors_and_touch_nothing(spec: dict, exc: type, match: str) -> None:
    model = MLP()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fxs.sparsify_graph(model, spec)
    assert_unchanged(model, before)


def test_module_without_weight_names_its_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="in_proj_weight"):
        fxs.sparsify_graph(model, {"weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5}]})


def test_integer_tensors_are_refused() -> None:
    model = MLP()
    model.register_parameter("count", torch.nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    with pytest.raises(TypeError, match="floating-point"):
        fxs.sparsify_graph(
            model,
            {
                "weights": [
                    {"target": "count", "method": "dense"},
                    {"target": "count", "method": "l1_unstructured", "sparsity": 1},
                ]
            },
        )


def test_parametrized_weights_are_never_skipped_silently() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    for target in ("type:Linear", "0", "*"):
        with pytest.raises(ValueError, match=r"'0.weight' is computed by a parametrization.*original0"):
            fxs.sparsify_graph(model, {"weights": [{"target": target, "method": "l1_unstructured", "sparsity": 0.5}]})
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "2", "method": "l1_unstructured", "sparsity": 0.5}]})
    sgm.step()
    x = torch.randn(3, 8)
    torch.testing.assert_close(sgm.squash()(x), sgm(x))


def test_type_selector_on_layers_without_a_weight_names_their_tensors() -> None:
    model = nn.Sequential(nn.LSTM(4, 4))
    with pytest.raises(ValueError, match="type 'LSTM' have no parameter 'weight'.*'0.weight_ih_l0'"):
        fxs.sparsify_graph(model, {"weights": [{"target": "type:LSTM", "method": "l1_unstructured", "sparsity": 0.5}]})
