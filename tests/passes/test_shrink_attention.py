"""``heads`` rules on ``nn.MultiheadAttention`` (torchvision ViT's blocks, nn.TransformerEncoder): shrunk ≡ masked."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.mha import MHA_OP, HeadPrunedMultiheadAttention

CAPTURES = ["fx", pytest.param("export", marks=pytest.mark.skipif(MHA_OP is None, reason="no torch.library.custom_op"))]


class EncoderBlock(nn.Module):
    """torchvision's ``vision_transformer.EncoderBlock``: pre-norm attention and MLP, both residual."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """torchvision's ViT shape: patch convolution, class token, position embedding, encoder blocks, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 32, 4, 4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 32))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, 32) * 0.02)
        self.layers = nn.Sequential(EncoderBlock(), EncoderBlock())
        self.ln = nn.LayerNorm(32)
        self.heads = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.heads(self.ln(self.layers(x))[:, 0])


def _shrink_and_check(model: nn.Module, spec: dict, x: torch.Tensor, capture: str) -> tuple[nn.Module, nn.Module]:
    """sparsify → step → squash(shrink=True) and squash_into(copy, shrink=True): both equal the masked module."""
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture=capture)
    assert sgm._fxs.capture == capture
    sgm.step()
    small = sgm.squash(shrink=True)
    mine = copy.deepcopy(model)
    assert sgm.squash_into(mine, shrink=True) is mine
    with torch.no_grad():
        masked = sgm(x)
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine(x), masked, atol=1e-5, rtol=1e-5)
        program = torch.export.export(small, (x,))
        torch.testing.assert_close(program.module()(x), small(x), atol=1e-6, rtol=1e-6)
    # torch's own ops only: the program loads where fx_sparsify (its capture-time op) is not imported
    assert not any("fx_sparsify" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
    for module in (small, mine):  # a pickle of the shrunk module re-traces its code: the attention stays one call
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        with torch.no_grad():
            torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), masked, atol=1e-5, rtol=1e-5)
    return small, mine


@pytest.mark.parametrize("capture", CAPTURES)
def test_vit_attention_heads_shrink(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 3, 16, 16)
    spec = {"channels": [{"target": "re:layers\\.\\d+", "heads": 0.5}]}
    small, mine = _shrink_and_check(model, spec, x, capture)
    for i in (0, 1):
        sd = small.state_dict()
        assert sd[f"layers.{i}.self_attention.in_proj_weight"].shape == (48, 32)
        assert sd[f"layers.{i}.self_attention.in_proj_bias"].shape == (48,)
        assert sd[f"layers.{i}.self_attention.out_proj.weight"].shape == (32, 16)
        assert sd[f"layers.{i}.self_attention.out_proj.bias"].shape == (32,)  # the block's output keeps its width
        attn = mine.layers[i].self_attention
        assert isinstance(attn, HeadPrunedMultiheadAttention)
        assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.out_proj.in_features) == (2, 8, 32, 16)
    assert list(mine.state_dict()) == list(model.state_dict())
    if capture == "fx":  # the shrunk graph module calls the attention as a module, now with 2 heads
        assert small.get_submodule("layers.0.self_attention").num_heads == 2


def test_the_heads_kept_are_the_largest_and_each_heads_q_k_v_rows_go_together() -> None:
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 3, 16, 16)
    attn = model.layers[0].self_attention
    with torch.no_grad():
        for h in (1, 2):  # heads 1 and 2 small in q, k, v and out_proj: pruned
            for part in range(3):
                attn.in_proj_weight[part * 32 + h * 8 : part * 32 + (h + 1) * 8] *= 0.01
            attn.out_proj.weight[:, h * 8 : (h + 1) * 8] *= 0.01
    sgm = fxs.sparsify_graph(model, {"channels": [{"target": "layers.0", "heads": 2}]}, example_inputs=(x,))
    sgm.step()
    small = sgm.squash(shrink=True)
    kept = [h for h in range(4) if h not in (1, 2)]
    rows = torch.cat([torch.arange(part * 32 + h * 8, part * 32 + (h + 1) * 8) for part in range(3) for h in kept])
    cols = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    sd = small.state_dict()
    torch.testing.assert_close(sd["layers.0.self_attention.in_proj_weight"], attn.in_proj_weight.detach()[rows])
    torch.testing.assert_close(sd["layers.0.self_attention.out_proj.weight"], attn.out_proj.weight.detach()[:, cols])


class Encoder(nn.Module):
    """A model holding an ``nn.TransformerEncoder`` (fx keeps torch.nn modules as leaves: one call)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("capture", CAPTURES)
def test_transformer_encoder_attention_heads_shrink(capture: str, batch_first: bool) -> None:
    """Inside an fx leaf the attention runs as the encoder layer calls it (its fused fast path off once heads
    are gone); an export capture also shrinks the feed-forward layers, which fx cannot see inside the leaf."""
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    rules = [{"target": "re:encoder\\.layers\\.\\d+\\.self_attn", "heads": 0.25}]
    if capture == "export":
        rules.append({"target": "re:encoder\\.layers\\.\\d+\\.linear1", "sparsity": 0.5})
    small, mine = _shrink_and_check(model, {"channels": rules}, x, capture)
    sd = small.state_dict()
    assert sd["encoder.layers.1.self_attn.in_proj_weight"].shape == (72, 32)
    assert sd["encoder.layers.1.self_attn.out_proj.weight"].shape == (32, 24)
    assert sd["encoder.layers.1.linear1.weight"].shape == ((32, 32) if capture == "export" else (64, 32))
    assert all(m.self_attn.num_heads == 3 for m in mine.encoder.layers)


def test_attention_with_separate_key_value_sizes_and_bias_kv() -> None:
    """kdim / vdim other than embed_dim (q_proj_weight, k_proj_weight, v_proj_weight) and add_bias_kv."""

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, kdim=12, vdim=10, add_bias_kv=True, batch_first=True)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.attn(x, memory[..., :12], memory[..., 12:], need_weights=False)[0]

    torch.manual_seed(0)
    model = Cross().eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 22)
    sgm = fxs.sparsify_graph(model, {"channels": [{"target": "attn", "heads": 0.5}]}, example_inputs=(x, memory))
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x, memory), sgm(x, memory), atol=1e-5, rtol=1e-5)
    sd = small.state_dict()
    assert sd["attn.q_proj_weight"].shape == (16, 32) and sd["attn.k_proj_weight"].shape == (16, 12)
    assert sd["attn.v_proj_weight"].shape == (16, 10) and sd["attn.in_proj_bias"].shape == (48,)
    assert sd["attn.bias_k"].shape == (1, 1, 16) and sd["attn.out_proj.weight"].shape == (32, 16)
