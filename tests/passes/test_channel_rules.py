"""Channel rules of single ops (passes/channels/rules.py), each checked end to end: shrunk ≡ masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

GQA_FORMS = ["expand_reshape", "expand_flatten", "repeat_interleave", "torch_repeat_interleave", "output_size"]


class GQAttention(nn.Module):
    """Grouped-query attention (4 query heads, 2 kv heads of 8) with the kv heads repeated in one of the usual ways."""

    def __init__(self, form: str, dim: int = 32, heads: int = 4, kv: int = 2) -> None:
        super().__init__()
        self.form, self.heads, self.kv, self.head_dim = form, heads, kv, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv * self.head_dim)
        self.v = nn.Linear(dim, kv * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def repeat(self, t: torch.Tensor) -> torch.Tensor:
        b, kv, n, d = t.shape
        rep = self.heads // self.kv
        if self.form == "expand_reshape":  # Hugging Face's repeat_kv
            return t[:, :, None, :, :].expand(b, kv, rep, n, d).reshape(b, kv * rep, n, d)
        if self.form == "expand_flatten":
            return t.unsqueeze(2).expand(b, kv, rep, n, d).flatten(1, 2)
        if self.form == "repeat_interleave":
            return t.repeat_interleave(rep, dim=1)
        if self.form == "torch_repeat_interleave":
            return torch.repeat_interleave(t, rep, 1)
        return t.repeat_interleave(rep, dim=1, output_size=self.heads)  # the output size given: it shrinks too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.repeat(self.k(x).view(b, t, self.kv, self.head_dim).transpose(1, 2))
        v = self.repeat(self.v(x).view(b, t, self.kv, self.head_dim).transpose(1, 2))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class GQABlock(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = GQAttention(form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", GQA_FORMS)
def test_heads_rule_through_repeated_kv_heads(form: str, capture: str) -> None:
    """Pruning 2 of 4 query heads under 2 kv heads removes one kv head and its 2 query heads, whichever way the
    kv heads are repeated (repeat_interleave stopped heads rules: 'no channel rule for method .repeat_interleave()')."""
    torch.manual_seed(0)
    model, x = GQABlock(form).eval(), torch.randn(2, 5, 32)
    spec = {"channels": [{"target": "attn", "heads": 2}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture=capture)
    assert "2 kv heads (2 query heads each)" in sgm.shrink_plan()
    sgm.step()
    assert "| 2 → 1 " in sgm.shrink_plan()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    sd = small.state_dict()
    assert sd["attn.q.weight"].shape == (16, 32) and sd["attn.o.weight"].shape == (32, 16)
    assert sd["attn.k.weight"].shape == (8, 32) and sd["attn.v.weight"].shape == (8, 32)
    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x))


def test_repeat_interleave_without_dim_is_refused_with_the_reason() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x).repeat_interleave(2).view(x.shape[0], 16))

    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="repeat_interleave without a dim flattens the input"):
        fxs.sparsify_graph(Flat(), {"channels": [{"target": "fc1", "sparsity": 0.5}]}, example_inputs=(x,))
