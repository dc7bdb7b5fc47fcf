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
    assert (
        fxs.sparsify_graph(model, {"weights": [{"target": "layers.0.linear1", **L1}]}, example_inputs=(x,))._fxs.capture
        == "export"
    )


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


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(x)


def test_capture_error_names_the_innermost_failing_module() -> None:
    with pytest.raises(fxs.CaptureError, match=r"module 'mid.1' \(Branchy\)"):
        fxs.sparsify_graph(Nested(), {"weights": [{"target": "mid.0", **L1}]})


def test_misspelt_leaf_modules_and_concrete_args_are_errors() -> None:
    spec = {"weights": [{"target": "fc", **L1}]}
    with pytest.raises(ValueError, match="no submodule 'fx'.*closest: fc"):
        fxs.sparsify_graph(Branchy(), spec, leaf_modules=["fx"])
    with pytest.raises(ValueError, match="no argument.*'zz'.*arguments are x"):
        fxs.sparsify_graph(Branchy(), spec, concrete_args={"zz": 1})
    with pytest.raises(TypeError, match="leaf_modules entries"):
        fxs.sparsify_graph(Branchy(), spec, leaf_modules=[3])


def test_forward_hooks_are_not_dropped_silently() -> None:
    model = MLP()
    model.fc1.register_forward_hook(lambda mod, args, out: out * 10)
    spec = {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.0}]}
    with pytest.raises(fxs.CaptureError, match="(?s)module 'fc1' \\(Linear\\) has forward hooks.*capture='export'"):
        fxs.sparsify_graph(model, spec)
    x = torch.randn(2, 16)
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))  # auto: export runs the hook into the graph
    assert sgm._fxs.capture == "export"
    torch.testing.assert_close(sgm(x), model(x))
    torch.testing.assert_close(sgm.squash()(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_weight_norm_model_gets_a_clear_error_with_the_fix() -> None:
    model = MLP()
    torch.nn.utils.weight_norm(model.fc1)  # old-style: a forward pre-hook, and tensors deepcopy refuses
    spec = {"weights": [{"target": "fc2", **L1}]}
    with pytest.raises(TypeError, match="(?s)deepcopy failed.*inplace=True.*remove_weight_norm"):
        fxs.sparsify_graph(model, spec)
    with pytest.raises(fxs.CaptureError, match="(?s)fc1.*forward hooks.*remove_weight_norm"):
        fxs.sparsify_graph(model, spec, inplace=True)
