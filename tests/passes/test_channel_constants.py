"""Zero weight rows (``ln_structured`` with ``dim=0``) shrink too: their constants fold into the consumers'
biases, or the channel stays and ``shrink_plan()`` says why (SPEC §10, issue item 5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

from _channel_models import (
    MLP,
    MobileNetV2Mini,
    ResidualCNN,
    random_residual_cnn,
    random_residual_cnn_cases,
    randomise_norms,
)


def _rows(target: str, sparsity: float = 0.5) -> dict[str, Any]:
    return {"weights": [{"target": target, "method": "ln_structured", "sparsity": sparsity, "dim": 0}]}


def _shrink(model: nn.Module, spec: dict[str, Any], x: torch.Tensor, capture: str = "auto") -> tuple[Any, Any]:
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture=capture)
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    return sgm, small


class ConvBNReLU(nn.Module):
    """Conv-BN-ReLU, Conv-BN-sigmoid (1x1, no padding), an unpadded conv, flatten, Linear."""

    def __init__(self, pad_second: int = 0) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 1 + 2 * pad_second, padding=pad_second), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = torch.sigmoid(self.b2(self.c2(y)))
        return self.fc(torch.flatten(F.relu(self.c3(y)), 1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_mlp_zero_rows_shrink_and_their_constants_fold(capture: str) -> None:
    model, x = MLP(), torch.randn(6, 20)
    sgm, small = _shrink(model, _rows("re:fc[12]"), x, capture)
    sd = small.state_dict()
    assert (
        sd["fc1.weight"].shape == (32, 20) and sd["fc2.weight"].shape == (24, 32) and sd["fc3.weight"].shape == (5, 24)
    )
    # gelu(bias) and tanh(bias) of the pruned units went into the next layer's bias
    assert not torch.equal(sd["fc3.bias"], model.fc3.bias.detach())
    assert "64 → 32" in sgm.shrink_plan() and "48 → 24" in sgm.shrink_plan()
    torch.export.export(small, (x,))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_conv_bn_relu_chain_zero_rows_shrink_with_batchnorm_shift_folded(capture: str) -> None:
    model, x = randomise_norms(ConvBNReLU().eval()), torch.randn(2, 3, 6, 6)
    sgm, small = _shrink(model, _rows("type:Conv2d"), x, capture)
    sd = small.state_dict()
    assert sd["c1.weight"].shape == (8, 3, 3, 3) and sd["b1.running_mean"].shape == (8,)
    assert sd["c2.weight"].shape == (16, 8, 1, 1) and sd["c3.weight"].shape == (4, 16, 3, 3)
    assert sd["fc.weight"].shape == (5, 64)
    if capture == "fx":
        assert small.b2.num_features == 16 and small.fc.in_features == 64


def test_zero_padded_consumer_keeps_the_channels_whose_constant_is_not_zero() -> None:
    model, x = randomise_norms(ConvBNReLU(pad_second=1).eval()), torch.randn(2, 3, 6, 6)
    sgm, small = _shrink(model, _rows("c1"), x)
    plan = sgm.shrink_plan()
    assert "pads with zeros" in plan and "zero-row channel(s) kept" in plan
    with torch.no_grad():  # exactly the pruned units with relu(bn(bias)) == 0 went
        b1 = model.b1
        pruned = sgm.masks()["c1.weight"].flatten(1).any(1).logical_not()
        const = F.relu((model.c1.bias - b1.running_mean) / (b1.running_var + b1.eps).sqrt() * b1.weight + b1.bias)
    assert small.state_dict()["c1.weight"].shape[0] == 16 - int((pruned & (const == 0)).sum())


def test_consumer_without_bias_keeps_the_channel_and_says_why() -> None:
    class NoBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.sigmoid(self.fc1(x)))  # sigmoid(bias) is never 0

    sgm, small = _shrink(NoBias(), _rows("fc1"), torch.randn(3, 8))
    assert "fc2 has no bias to take the pruned channel's constant" in sgm.shrink_plan()
    assert small.state_dict()["fc1.weight"].shape == (16, 8)


def test_a_residual_reaching_the_output_is_not_removable_and_names_the_node() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(x) + self.fc1(x)

    sgm, small = _shrink(Residual(), _rows("fc1"), torch.randn(3, 8))
    plan = sgm.shrink_plan()
    assert "| no " in plan and "reaches the model's output" in plan and "add" in plan
    assert small.state_dict()["fc1.weight"].shape == (8, 8)


def test_an_input_dependent_gate_keeps_the_channel() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.gate, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.silu(self.fc1(x)) * self.gate(x))

    sgm, small = _shrink(Gated(), _rows("fc1"), torch.randn(3, 8))
    assert "kept: gate also produces them and its weight rows there are not all zero" in sgm.shrink_plan()
    assert small.state_dict()["fc1.weight"].shape == (16, 8)
    both = {"weights": [{"target": "re:fc1|gate", "method": "random_structured", "sparsity": 0.5, "dim": 0}]}
    sgm, small = _shrink(Gated(), both, torch.randn(3, 8))  # where both rows are zero the product is a constant
    masks = sgm.masks()
    both_zero = ~masks["fc1.weight"].any(1) & ~masks["gate.weight"].any(1)
    assert small.state_dict()["fc1.weight"].shape[0] == 16 - int(both_zero.sum())


@pytest.mark.parametrize(
    "build,shape",
    [(ResidualCNN, (2, 3, 8, 8)), (MobileNetV2Mini, (2, 3, 16, 16))],
    ids=["residual-depthwise-se", "mobilenet-v2"],
)
def test_residual_depthwise_and_gated_cnns_stay_exact(build: Any, shape: tuple[int, ...]) -> None:
    model = randomise_norms(build().eval())
    _, small = _shrink(model, _rows("type:Conv2d"), torch.randn(*shape))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@random_residual_cnn_cases
def test_random_zero_rows_on_random_residual_cnns_shrink_exactly(
    widths: list[int], residual: list[bool], sparsity: float, seed: int
) -> None:
    model = random_residual_cnn(widths, residual, seed)
    spec = {
        "seed": seed,
        "weights": [{"target": "re:convs\\.\\d+", "method": "random_structured", "sparsity": sparsity, "dim": 0}],
    }
    _, small = _shrink(model, spec, torch.randn(2, 3, 6, 6))
    for i, w in enumerate(widths):
        assert small.state_dict()[f"convs.{i}.weight"].shape[0] <= w
