from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.trace import SparsityTracer, capture_graph

from models import MLP, SmallCNN, transformer_encoder

L1 = {"method": "l1_unstructured", "sparsity": 0.5}


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # shape-dependent control flow: symbolic tracing fails here, export handles it
            return self.fc(x)
        return -self.fc(x)


def test_fx_capture_keeps_layers_as_module_calls() -> None:
    gm = capture_graph(SmallCNN(), capture="fx").gm
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"stem", "bn", "blocks.0.dw", "reflect", "fc"} <= called


def test_capture_error_names_module_line_and_ways_out() -> None:
    with pytest.raises(fxs.CaptureError) as info:
        fxs.sparsify_graph(Branchy(), {"weights": [{"target": "fc", **L1}]})
    message = str(info.value)
    assert "test_trace.py" in message and "x.shape[0] > 1" in message
    assert "example_inputs" in message and "leaf_modules" in message and "concrete_args" in message
    assert isinstance(info.value, ValueError)


def test_auto_falls_back_to_export_with_example_inputs() -> None:
    x = torch.ones(2, 4)
    sgm = fxs.sparsify_graph(Branchy(), {"weights": [{"target": "fc", **L1}]}, example_inputs=(x,))
    assert sgm._fxs.capture == "export"
    sgm.step()
    torch.testing.assert_close(sgm.squash()(x), sgm(x))


def test_transformer_needs_export_and_auto_gets_there() -> None:
    model = transformer_encoder()
    with pytest.raises(fxs.CaptureError):
        fxs.sparsify_graph(model, {"weights": [{"target": "layers.0.linear1", **L1}]}, capture="fx")
    x = torch.randn(1, 3, 16)
    assert fxs.sparsify_graph(model, {"weights": [{"target": "layers.0.linear1", **L1}]}, example_inputs=(x,))._fxs.capture == "export"


def test_leaf_modules_and_concrete_args() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Branchy()
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
            y = self.out(self.inner(x))
            return -y if flip else y

    spec = {"weights": [{"target": "out", **L1}]}
    model = Outer()
    sgm = fxs.sparsify_graph(model, spec, leaf_modules=[Branchy], concrete_args={"flip": False})
    assert any(n.op == "call_module" and n.target == "inner" for n in sgm.graph.nodes)
    sgm2 = fxs.sparsify_graph(model, spec, leaf_modules=["inner"], concrete_args={"flip": True})
    x = torch.randn(3, 4)
    torch.testing.assert_close(sgm2(x, True), -sgm(x, False))


def test_tracer_looks_parameters_up_once_not_per_access(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stock tracer scans named_parameters on every access (quadratic); ours builds a dict once."""
    calls = {"n": 0}
    original = nn.Module.named_parameters

    def counting(self: nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self, *args, **kwargs)

    class Deep(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.ws = nn.ParameterList([nn.Parameter(torch.randn(4, 4)) for _ in range(n)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for w in self.ws:
                x = x @ w
            return x

    monkeypatch.setattr(nn.Module, "named_parameters", counting)
    counts = []
    for n in (10, 40):
        calls["n"] = 0
        SparsityTracer().trace(Deep(n))
        counts.append(calls["n"])
    assert counts[0] == counts[1]  # independent of the number of parameters accessed
