"""Reshapes whose size on the channel dim is computed at run time (passes/channels/reshape.py, rules.py).

``a.reshape(b, t, x.shape[-1])`` with ``x`` the unpruned residual stream keeps the old width after a
shrink; the channel analysis refuses such a group (the rule's error names the reshape and the fix) instead
of a shrunk model that fails at run time. A size that reads one of the group's own channel dims
(``kv * rep`` in Hugging Face's repeat_kv, ``a.shape[2] * a.shape[3]``) follows the shrink and is kept.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import symbolic_trace

import fx_sparsify as fxs
from fx_sparsify.passes.channels.reshape import size_reads


class Attn(nn.Module):
    def __init__(self, merge: str, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.merge, self.heads = merge, heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        if self.merge == "stream width":  # the residual stream's width: does not shrink with the heads
            a = a.reshape(b, t, x.shape[-1])
        elif self.merge == "own sizes":  # the heads and head size of the tensor itself
            a = a.reshape(b, t, a.shape[2] * a.size(3))
        else:
            a = a.reshape(b, t, -1)
        return x + self.o(a)


SPEC = {"channels": [{"target": "re:.*", "heads": 1}]}


def test_a_width_read_from_an_unshrunk_tensor_is_refused() -> None:
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"computed at run time .* does not shrink; write -1") as info:
        fxs.sparsify_graph(Attn("stream width").eval(), SPEC, example_inputs=(x,))
    assert "reshape" in str(info.value) and "shrink_plan()" in str(info.value)


@pytest.mark.parametrize("merge", ["own sizes", "minus one"])
def test_a_width_that_follows_the_heads_shrinks(merge: str) -> None:
    model = Attn(merge).eval()
    x = torch.randn(2, 5, 32)
    sgm = fxs.sparsify_graph(model, SPEC, example_inputs=(x,))
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        assert small.o.weight.shape == (32, 24)
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)


def test_size_reads_of_size_expressions() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], y.size(1) * 2, x.size()[-1] // 4, x.numel(), 3)

    gm = symbolic_trace(M())
    node = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape")
    x, y = (n for n in gm.graph.nodes if n.op == "placeholder")
    ndim = {x: 3, y: 2}.__getitem__
    assert size_reads(node.args[1], ndim) == [(x, 0)]
    assert size_reads(node.args[2], ndim) == [(y, 1)]
    assert size_reads(node.args[3], ndim) == [(x, 2)]  # -1 made non-negative
    assert size_reads(node.args[4], ndim) is None  # x.numel(): not a size read it knows
    assert size_reads(node.args[5], ndim) == []  # a constant
    assert node.args[2].target is operator.mul
