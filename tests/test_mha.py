"""fx_sparsify.mha: the attention a shrunk nn.MultiheadAttention runs equals nn.MultiheadAttention with all heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fx_sparsify.mha import MHA_OP, HeadPrunedMultiheadAttention, as_head_pruned, attention_as_op, multi_head_attention

CONFIGS: list[dict[str, Any]] = [
    {},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"kdim": 12, "vdim": 10},
    {"bias": False},
]


def _inputs(kw: dict[str, Any], batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, k, v = torch.randn(2, 5, 16), torch.randn(2, 6, kw.get("kdim", 16)), torch.randn(2, 6, kw.get("vdim", 16))
    return (x, k, v) if batch_first else (x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw", CONFIGS, ids=["packed", "bias_kv", "zero_attn", "kdim_vdim", "no_bias"])
def test_equals_nn_multihead_attention(kw: dict[str, Any], batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw).eval()
    q, k, v = _inputs(kw, batch_first)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    mask = torch.randn(5, 6)
    want = m(
        q,
        k,
        v,
        key_padding_mask=padding.float().masked_fill(padding, float("-inf")),
        need_weights=need_weights,
        attn_mask=mask,
    )
    got = multi_head_attention(
        q,
        k,
        v,
        m.in_proj_weight,
        m.in_proj_bias,
        m.out_proj.weight,
        m.out_proj.bias,
        m.head_dim,
        batch_first,
        padding,
        need_weights,
        mask,
        True,
        m.q_proj_weight,
        m.k_proj_weight,
        m.v_proj_weight,
        m.bias_k,
        m.bias_v,
        m.add_zero_attn,
        0.0,
    )
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    else:
        assert got[1] is None


def test_unbatched_input_and_a_three_dimensional_mask() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 16)
    got = multi_head_attention(x, x, x, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, 4, False)
    torch.testing.assert_close(got[0], m(x, x, x)[0], atol=1e-5, rtol=1e-5)
    per_head = torch.randn(2 * 4, 5, 5)
    x3 = torch.randn(5, 2, 16)
    want = m(x3, x3, x3, attn_mask=per_head, need_weights=False)[0]
    got = multi_head_attention(
        x3,
        x3,
        x3,
        m.in_proj_weight,
        m.in_proj_bias,
        m.out_proj.weight,
        m.out_proj.bias,
        4,
        False,
        need_weights=False,
        attn_mask=per_head,
    )[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_as_head_pruned_counts_the_heads_left_and_refuses_masks_for_more() -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    as_head_pruned(m)
    assert type(m) is nn.MultiheadAttention  # all heads: left alone
    keep = torch.cat([torch.arange(p * 16, p * 16 + 8) for p in range(3)])  # heads 0 and 1 of q, k, v
    m.in_proj_weight = nn.Parameter(m.in_proj_weight.detach()[keep])
    m.in_proj_bias = nn.Parameter(m.in_proj_bias.detach()[keep])
    m.out_proj.weight = nn.Parameter(m.out_proj.weight.detach()[:, :8])
    as_head_pruned(m)
    assert isinstance(m, HeadPrunedMultiheadAttention) and m.num_heads == 2 and m.head_dim == 4
    x = torch.randn(2, 5, 16)
    out, weights = m(x, x, x)
    assert out.shape == (2, 5, 16) and weights is not None and weights.shape == (2, 5, 5)
    with pytest.raises(ValueError, match="needs 4 masks, got 8"):
        m(x, x, x, attn_mask=torch.zeros(8, 5, 5))


@pytest.mark.skipif(MHA_OP is None, reason="no torch.library.custom_op")
def test_attention_as_op_is_one_op_in_an_export_and_restores_the_module() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    m, x = M().eval(), torch.randn(2, 5, 16)
    with attention_as_op([m.attn]):
        ep = torch.export.export(m, (x,))
    assert "forward" not in vars(m.attn)
    marker = m.attn.forward
    m.attn.forward = marker  # type: ignore[method-assign]  # a forward the user set on the instance stays
    with attention_as_op([m.attn]):
        assert m.attn.forward is not marker
    assert vars(m.attn)["forward"] is marker
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "multi_head_attention" in str(n.target)]
    assert len(calls) == 1 and not any("scaled_dot_product" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)
