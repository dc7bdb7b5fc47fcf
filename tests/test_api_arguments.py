"""Argument checks of the facade: wrong types are errors that say what to pass, never silent misbehaviour."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

from models import MLP


@pytest.mark.parametrize("fn", [fxs.step, fxs.squash, fxs.masks, fxs.sparsity, fxs.report])
def test_function_forms_on_a_plain_module_name_sparsify_graph(fn) -> None:
    with pytest.raises(TypeError, match="sparsify_graph"):
        fn(nn.Linear(2, 2))


RULE = {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}]}


def test_inplace_given_as_a_string_is_refused_and_the_model_untouched() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"inplace must be True or False, got str: 'False'"):
        fxs.sparsify_graph(model, RULE, inplace="False")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not hasattr(model, "_fxs")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"leaf_modules": "fc1"}, r"leaf_modules must be a list.*got str: 'fc1'.*leaf_modules=\['fc1'\]"),
        ({"leaf_modules": nn.Linear}, r"leaf_modules must be a list"),
        ({"concrete_args": ["x"]}, r"concrete_args must be a dict"),
        ({"capture": None}, r"capture must be 'fx', 'export' or 'auto'"),
    ],
)
def test_argument_types_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        fxs.sparsify_graph(MLP(), RULE, **kwargs)


def test_leaf_modules_as_a_list_still_works() -> None:
    sgm = fxs.sparsify_graph(MLP(), RULE, leaf_modules=["fc2"])
    assert "fc1.weight" in sgm.masks()


def test_int_sparsity_that_looks_like_a_percentage_warns() -> None:
    spec = {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 50}]}  # fc2: 256x256
    with pytest.warns(
        UserWarning, match=r"target 'fc2.weight': sparsity=50 is an int, so it prunes 50 of the 65536 entries"
    ):
        sgm = fxs.sparsify_graph(MLP(hidden=256), spec)
    sgm.step()
    assert int((~sgm.masks()["fc2.weight"]).sum()) == 50  # counts stay counts


@pytest.mark.parametrize(
    "spec",
    [
        {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 20}]},  # 2 % of 1024: a real count
        {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 1}]},
        {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5}]},
        {"weights": [{"target": "fc2", "method": "ln_structured", "sparsity": 2}]},  # a count of slices
        {"global": [{"targets": ["fc1", "head"], "method": "l1_unstructured", "sparsity": 50}]},  # 6.5 % of 768
    ],
)
def test_counts_that_do_not_look_like_percentages_are_silent(spec: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxs.sparsify_graph(MLP(), spec)


def test_global_count_warns_against_the_group_total() -> None:
    spec = {"global": [{"targets": ["fc1", "fc2"], "method": "topk", "sparsity": 10}]}  # 10 of 1536
    with pytest.warns(UserWarning, match=r"global rule over fc1, fc2: sparsity=10 .* of the 1536 entries"):
        fxs.sparsify_graph(MLP(), spec)


def test_a_percentage_like_count_warns_at_the_users_line() -> None:
    spec = {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 50}]}
    with pytest.warns(UserWarning, match=r"sparsity=50 is an int") as caught:
        fxs.sparsify_graph(MLP(hidden=256), spec)
    assert [w.filename for w in caught if "is an int" in str(w.message)] == [__file__]
