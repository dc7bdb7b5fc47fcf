"""The cyclic collector is paused for a capture and its passes (issue 14), never left off, on for export."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.trace import gc_running, pausing_gc

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
SEEN: list[bool] = []  # module level: the deep copy that sparsify_graph traces appends here too


class Recorder(nn.Module):
    """Records whether the collector runs each time forward is called (fx tracing and export call it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen = SEEN
        SEEN.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(gc.isenabled())
        return self.fc(x)


@pytest.fixture
def gc_on() -> None:
    assert gc.isenabled()  # pytest runs with the collector on
    yield
    gc.enable()


def test_fx_capture_runs_with_the_collector_paused_and_turns_it_back_on(gc_on: None) -> None:
    model = Recorder()
    sgm = fxs.sparsify_graph(model, SPEC, capture="fx")
    assert model.seen == [False]
    assert gc.isenabled()
    assert isinstance(sgm, fxs.SparseGraphModule)


def test_export_runs_with_the_collector_on(gc_on: None) -> None:
    model = Recorder()
    fxs.sparsify_graph(model, SPEC, capture="export", example_inputs=(torch.randn(2, 4),))
    assert model.seen and all(model.seen)
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off(gc_on: None) -> None:
    gc.disable()
    model = Recorder()
    fxs.sparsify_graph(model, SPEC, capture="export", example_inputs=(torch.randn(2, 4),))
    assert model.seen and not any(model.seen)  # not ours to turn on, even for export
    assert not gc.isenabled()


def test_the_collector_is_back_on_after_an_error(gc_on: None) -> None:
    with pytest.raises(KeyError, match="no_such_method"):
        fxs.sparsify_graph(Recorder(), {"weights": [{"target": "type:Linear", "method": "no_such_method"}]})
    assert gc.isenabled()

    @pausing_gc
    def boom() -> None:
        assert not gc.isenabled()
        with gc_running():
            assert gc.isenabled()
        assert not gc.isenabled()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        boom()
    assert gc.isenabled()


def test_nested_pauses_restore_only_at_the_outermost(gc_on: None) -> None:
    @pausing_gc
    def inner() -> bool:
        return gc.isenabled()

    @pausing_gc
    def outer() -> tuple[bool, bool]:
        return inner(), gc.isenabled()

    assert outer() == (False, False)
    assert gc.isenabled()
    with gc_running():  # outside any pause: nothing to do
        assert gc.isenabled()


def test_the_signature_and_docstring_are_the_function_s() -> None:
    params = inspect.signature(fxs.sparsify_graph).parameters
    assert list(params)[:2] == ["model", "spec"] and "inplace" in params
    assert fxs.sparsify_graph.__doc__ and fxs.sparsify_graph.__name__ == "sparsify_graph"
