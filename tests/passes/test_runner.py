"""The pass runner: passes run in order on the module the one before returned; an error names its pass."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch.fx import GraphModule, symbolic_trace

from fx_sparsify.passes._runner import PassResult, finish, pass_name, run_passes

from models import MLP


def _gm() -> GraphModule:
    return symbolic_trace(MLP())


def add_relu_at_output(gm: GraphModule, state: list[str]) -> PassResult:
    state.append("add_relu_at_output")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        relu = gm.graph.call_function(torch.relu, (out.args[0],))
    out.args = (relu,)
    return finish(gm, {"relu": {"node": relu.name}})


def fresh_copy(gm: GraphModule, state: list[str]) -> PassResult:
    state.append("fresh_copy")
    return PassResult(GraphModule(gm, copy.deepcopy(gm.graph)), True)


def refuse(gm: GraphModule, state: Any, *, why: str = "no") -> PassResult:
    raise ValueError(f"cannot: {why}")


def test_passes_run_in_order_each_on_the_module_the_last_returned() -> None:
    gm, seen = _gm(), []
    results = run_passes(gm, seen, [fresh_copy, add_relu_at_output])
    assert seen == ["fresh_copy", "add_relu_at_output"]
    assert results[0].gm is not gm and results[1].gm is results[0].gm
    assert results[1].created == {"relu": {"node": "relu_2"}} and results[1].modified
    relus = [sum(n.target is torch.relu for n in m.graph.nodes) for m in (gm, results[1].gm)]
    assert relus == [2, 3]


def test_an_error_is_raised_again_as_its_type_with_the_pass_name_chained_to_the_original() -> None:
    with pytest.raises(ValueError, match=r"^refuse: cannot: because") as info:
        run_passes(_gm(), None, [functools.partial(refuse, why="because")])
    assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) == "cannot: because"


class _TwoArgs(Exception):
    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"{node}: {reason}")
        self.node = node


def test_an_error_type_that_needs_more_than_a_message_goes_on_unchanged_with_a_note() -> None:
    def strict(gm: GraphModule, state: Any) -> PassResult:
        raise _TwoArgs("fc1", "unmappable")

    with pytest.raises(_TwoArgs) as info:
        run_passes(_gm(), None, [strict])
    assert info.value.node == "fc1" and str(info.value) == "fc1: unmappable"
    if hasattr(info.value, "add_note"):
        assert info.value.__notes__ == ["(in pass strict)"]


def test_a_key_error_keeps_its_type_and_attributes() -> None:
    def missing(gm: GraphModule, state: Any) -> PassResult:
        err = KeyError("no tensor 'x'")
        err.where = "fc1"  # type: ignore[attr-defined]
        raise err

    with pytest.raises(KeyError, match="missing: no tensor 'x'") as info:
        run_passes(_gm(), None, [missing])
    assert info.value.where == "fc1"  # type: ignore[attr-defined]


def test_pass_names() -> None:
    assert pass_name(refuse) == "refuse"
    assert pass_name(functools.partial(functools.partial(refuse), why="x")) == "refuse"


class _Unused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_sparsify_graph_errors_name_the_pass_that_raised() -> None:
    import fx_sparsify as fxs

    spec = {"weights": [{"target": "unused", "method": "l1_unstructured", "sparsity": 0.5}]}
    with pytest.raises(ValueError, match=r"^insert_weight_masks: target\(s\) 'unused.weight' are never used") as info:
        fxs.sparsify_graph(_Unused(), spec)
    assert isinstance(info.value.__cause__, ValueError) and not str(info.value.__cause__).startswith("insert_")
