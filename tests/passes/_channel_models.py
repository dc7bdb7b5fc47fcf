"""Small models for the channel-group and shrink tests (SPEC §10)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


def randomise_norms(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their identity defaults (a pruned channel's
    BatchNorm output is then a non-zero constant, which must not leak into the shrunk model)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1, 1)
    return model


class ResidualCNN(nn.Module):
    """Conv+BN+ReLU stem, a residual block, a depthwise-separable block, an SE gate, pool, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.se1 = nn.Linear(24, 6)
        self.se2 = nn.Linear(6, 24)
        self.fc = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = y + F.relu(self.b2(self.c2(y)))
        y = self.pw(F.relu(self.dw(y)))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3))))))
        y = y * gate[:, :, None, None]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention with separate projections; ``kv < heads`` is grouped-query attention."""

    def __init__(self, dim: int = 32, heads: int = 4, kv: int = 4, sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.kv, self.head_dim, self.sdpa = heads, kv, dim // heads, sdpa
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv * self.head_dim)
        self.v = nn.Linear(dim, kv * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv
        if rep > 1:
            k = k[:, :, None].expand(b, self.kv, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
            v = v[:, :, None].expand(b, self.kv, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention + an MLP, both residual."""

    def __init__(self, **attention: int | bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(32)
        self.attn = Attention(**attention)  # type: ignore[arg-type]
        self.ln2 = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.silu(self.up(self.ln2(x))))


class FusedGateUp(nn.Module):
    """A fused gate/up projection split by chunk: the channels cannot be removed (pieces must stay equal)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(16, 64)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def random_residual_cnn(widths: list[int], residual: list[bool], seed: int) -> nn.Module:
    """A chain of Conv+BN+ReLU stages; a stage with ``residual`` and equal widths adds its input back."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            chans = [3, *widths]
            self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(len(widths)))
            self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
            self.res = [r and chans[i] == chans[i + 1] for i, r in enumerate(residual[: len(widths)])]
            self.head = nn.Linear(widths[-1], 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv, bn, res in zip(self.convs, self.bns, self.res):
                y = F.relu(bn(conv(x)))
                x = x + y if res else y
            return self.head(x.mean((2, 3)))

    return randomise_norms(Net().eval())


class InvertedResidual(nn.Module):
    """MobileNetV2's block (torchvision layout): 1x1 expand, 3x3 depthwise, 1x1 project, residual when it fits."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Mini(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)),
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def random_residual_cnn_cases(test: Callable[..., Any]) -> Callable[..., Any]:
    """Six derandomised Hypothesis cases for ``test(widths, residual, sparsity, seed)``: the arguments of
    :func:`random_residual_cnn`, and a sparsity in [0, 0.9]."""
    return settings(max_examples=6, deadline=None, derandomize=True)(
        given(
            widths=st.lists(st.sampled_from([4, 8, 12]), min_size=2, max_size=4),
            residual=st.lists(st.booleans(), min_size=4, max_size=4),
            sparsity=st.floats(0.0, 0.9),
            seed=st.integers(0, 1000),
        )(test)
    )
