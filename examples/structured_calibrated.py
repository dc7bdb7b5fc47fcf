"""Structured pruning with calibration: half the MLP neurons and a quarter of the attention heads of a small
LLaMA-style model (gated MLP, grouped-query attention) ranked by structured OBS, the consumers refit.

    python examples/structured_calibrated.py

Prints the mean squared output error against the dense model of magnitude ranking and of
``"importance": "obs", "reconstruct": true`` on held-out inputs, and the parameter counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.methods.channel_importance import GroupStats


class Attention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 176) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(64), nn.LayerNorm(64)
        self.self_attn, self.mlp = Attention(), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 64)
        self.layers = nn.ModuleList(Layer() for _ in range(2))
        self.head = nn.Linear(64, 128, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def prune(model: nn.Module, spec: dict, x: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    for batch in calibration:  # forward passes collect the consumers' input statistics
        sgm(batch)
    sgm.step()  # channels chosen; consumers refit
    small = sgm.squash(shrink=True)  # computes what sgm computes
    assert float((small(x) - sgm(x)).abs().max()) <= 1e-4
    return small


def register_last_channels() -> None:
    """An importance of your own: one score per unit of a group (here: keep the last units)."""

    @fxs.register_channel_importance("last-channels", override=True)
    def last(group: GroupStats) -> torch.Tensor:  # group.units, group.consumers, group.magnitude
        return torch.arange(group.units, dtype=torch.float64)  # one score per unit; the highest are kept


def main() -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyLM().eval()
    x = torch.randint(0, 128, (2, 16))
    calibration = [torch.randint(0, 128, (8, 16)) for _ in range(8)]
    held_out = torch.randint(0, 128, (16, 16))
    spec = {
        "channels": [
            {"target": "re:.*mlp\\.up_proj", "sparsity": 0.5, "importance": "obs", "reconstruct": True},
            {"target": "re:.*self_attn", "heads": 0.25, "importance": "obs", "reconstruct": True},
        ]
    }
    magnitude = {"channels": [{**rule, "importance": "magnitude", "reconstruct": False} for rule in spec["channels"]]}
    out: dict[str, float] = {}
    with torch.no_grad():
        dense = model(held_out)
        for name, rules in (("magnitude", magnitude), ("obs + reconstruct", spec)):
            small = prune(model, rules, x, calibration)
            out[name] = float((small(held_out) - dense).square().mean())
            out[f"{name} parameters"] = sum(p.numel() for p in small.parameters())
        register_last_channels()
        small = prune(
            model,
            {"channels": [{"target": "layers.0.mlp.up_proj", "sparsity": 0.5, "importance": "last-channels"}]},
            x,
            calibration,
        )
        out["last-channels kept up_proj rows"] = small.state_dict()["layers.0.mlp.up_proj.weight"].shape[0]
    out["dense parameters"] = sum(p.numel() for p in model.parameters())
    return out


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.6g}")
