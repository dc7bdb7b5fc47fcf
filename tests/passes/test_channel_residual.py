"""Sequential channels refits that aim at the residual add's result (passes/channels/residual.py).

A consumer whose output is added to a residual stream is refit, in sequential mode, towards what the
calibration forwards gave the add: checked against torch.linalg.lstsq of ``W·x + b + r − r'`` on the
replayed inputs' kept columns (``x'``, ``r'`` computed here from the pruned model's weights).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import symbolic_trace

import fx_sparsify as fxs
from fx_sparsify.methods.channel_importance import ConsumerStats, corrected_weight
from fx_sparsify.passes.channels.residual import ResidualRowsObserver, residual_operand

F64 = torch.float64


class Residual(nn.Module):
    """Two pre-norm-free residual MLP blocks: x + fc2(gelu(fc1(x))), twice."""

    def __init__(self, d: int = 12, hidden: int = 24, dropout: bool = False) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.b1, self.b2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.a2(F.gelu(self.a1(x))))
        return self.b2(F.gelu(self.b1(x))) + x


def _spec(importance: str = "activation") -> dict:
    rule = {
        "target": r"re:[ab]1",
        "sparsity": 0.5,
        "round_to": 1,
        "importance": importance,
        "reconstruct": True,
        "sequential": True,
        "damp": 0.0,
    }
    return {"channels": [rule]}


def _pruned(model: nn.Module, batches: list[torch.Tensor], importance: str = "activation") -> fxs.SparseGraphModule:
    sgm = fxs.sparsify_graph(model, _spec(importance), example_inputs=(batches[0],))
    with torch.no_grad():
        for b in batches:
            sgm(b)
    sgm.step()
    return sgm


@pytest.mark.parametrize("dropout", [False, True])
def test_second_consumer_aims_at_the_residual_sum(dropout: bool) -> None:
    torch.manual_seed(0)
    model = Residual(dropout=dropout).eval()
    batches = [torch.randn(64, 12) + 0.5 for _ in range(3)]
    sgm = _pruned(model, batches)
    p, m = dict(sgm.named_parameters()), sgm.masks()
    w = {k: p[k] * m[k] if k in m else p[k] for k in p}
    with torch.no_grad():
        x = torch.cat(batches)
        r = x + model.a2(F.gelu(model.a1(x)))  # the stream b2's output is added to, calibration forwards
        r_new = x + F.linear(F.gelu(F.linear(x, w["a1.weight"], w["a1.bias"])), w["a2.weight"], w["a2.bias"])
        h_new = F.gelu(F.linear(r_new, w["b1.weight"], w["b1.bias"])).double()
        y = model.b2(F.gelu(model.b1(r))).double() + (r - r_new).double()
    keep = m["b1.bias"].bool()
    a = torch.cat([h_new[:, keep], torch.ones(len(x), 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(p["b2.weight"][:, keep].double(), sol[:-1].T, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(p["b2.bias"].double(), sol[-1], atol=5e-4, rtol=1e-3)
    observers = [mod for mod in sgm.modules() if isinstance(mod, ResidualRowsObserver)]
    assert len(observers) == 2 and all(not o.kept and not o.diffs for o in observers)  # rows go with the step
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        assert float((small(batches[0]) - sgm(batches[0])).abs().max()) <= 1e-4
    assert not any(isinstance(mod, ResidualRowsObserver) for mod in small.modules())


def test_residual_target_lowers_the_model_error() -> None:
    """The add's result is what the model returns here: on the calibration data, aiming the refit at it gives a
    smaller model error than aiming at the layer's own output (the refit is that error's least-squares minimiser)."""
    torch.manual_seed(1)
    model = Residual().eval()
    batches = [torch.randn(64, 12) + 0.5 for _ in range(3)]
    sgm = _pruned(model, batches, "obs")
    with torch.no_grad():
        x = torch.cat(batches)
        ours = float((sgm(x) - model(x)).square().mean())
    plain = fxs.sparsify_graph(model, _spec("obs"), example_inputs=(batches[0],))
    for mod in plain.modules():
        if getattr(mod, "residual", None):
            mod.residual = None  # the refit without the residual target, as before
    with torch.no_grad():
        for b in batches:
            plain(b)
        plain.step()
        before = float((plain(x) - model(x)).square().mean())
    assert ours < before, (ours, before)


def test_residual_operand_finds_the_add_only() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.g, self.drop = nn.Linear(4, 4), nn.Linear(4, 4), nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = x + self.drop(self.fc(x))  # through a dropout: x is the residual
            z = self.g(y)
            return y, z + z.relu(), torch.add(self.fc(y), y, alpha=2.0)

    gm = symbolic_trace(M())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("fc", "g")]
    found = residual_operand(gm, calls[0])
    assert found is not None and found[0].target is operator.add and found[1].op == "placeholder"
    assert residual_operand(gm, calls[1]) is None  # g's output has two users (z + relu(z))
    assert residual_operand(gm, calls[2]) is None  # add with alpha, and the other operand is not independent


@pytest.mark.parametrize("bias", [True, False])
def test_corrected_weight_with_residual_is_least_squares(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=F64) + 1
    x_new = x + 0.3 * torch.randn(200, 6, generator=g, dtype=F64)
    d = torch.randn(200, 3, generator=g, dtype=F64)  # r - r'
    w, b = torch.randn(3, 6, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    ones = torch.ones(200, 1, dtype=F64)
    xa, xa_new = torch.cat([x, ones], 1), torch.cat([x_new, ones], 1)
    c = ConsumerStats("fc", w, b if bias else None, xa_new.T @ xa_new, torch.arange(6).reshape(-1, 1))
    w2, b2 = corrected_weight(c, xa_new.T @ xa, 0.0, xa_new.T @ d)
    y = x @ w.T + (b if bias else 0) + d
    a = xa_new if bias else x_new
    sol = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(w2, sol[:6].T, atol=1e-9, rtol=1e-9)
    if bias:
        assert b2 is not None
        torch.testing.assert_close(b2, sol[6], atol=1e-9, rtol=1e-9)
    else:
        assert b2 is None


class LateStream(nn.Module):
    """The second block's stream is computed after its consumer's input: y = b2(gelu(b1(x))); r = g(x); y + r."""

    def __init__(self, d: int = 12, hidden: int = 24) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.b1, self.b2, self.g = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a2(F.gelu(self.a1(x)))
        y = self.b2(F.gelu(self.b1(x)))
        return y + self.g(x)


def test_a_stream_computed_after_the_consumer_input_falls_back_to_the_plain_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its differences are not ready when the consumer's replayed rows arrive: no residual target, and the refit
    is the plain one (lstsq of the layer's own calibration outputs on the replayed inputs)."""
    from fx_sparsify.passes.channels import importance

    aimed: list[bool] = []
    corrected = importance.corrected_weight

    def spy(c: ConsumerStats, cross: torch.Tensor, damp: float, residual: torch.Tensor | None = None) -> object:
        aimed.append(residual is not None)
        return corrected(c, cross, damp, residual)

    monkeypatch.setattr(importance, "corrected_weight", spy)
    torch.manual_seed(2)
    model = LateStream().eval()
    batches = [torch.randn(64, 12) + 0.5 for _ in range(3)]
    sgm = _pruned(model, batches)
    assert aimed == [False]
    p, m = dict(sgm.named_parameters()), sgm.masks()
    w = {k: p[k] * m[k] if k in m else p[k] for k in p}
    with torch.no_grad():
        x = torch.cat(batches)
        r = x + model.a2(F.gelu(model.a1(x)))
        r_new = x + F.linear(F.gelu(F.linear(x, w["a1.weight"], w["a1.bias"])), w["a2.weight"], w["a2.bias"])
        h_new = F.gelu(F.linear(r_new, w["b1.weight"], w["b1.bias"])).double()
        y = model.b2(F.gelu(model.b1(r))).double()
    keep = m["b1.bias"].bool()
    a = torch.cat([h_new[:, keep], torch.ones(len(x), 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(p["b2.weight"][:, keep].double(), sol[:-1].T, atol=5e-4, rtol=1e-3)
