"""The activation pass finds a layer's input by the op's schema (the operand that multiplies the weight),
refuses where the input is hidden, and accepts any layer called as a module (nn.Identity, activations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a Linear with a transposed weight, computed as ``addmm(bias, x, weight)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, conv: type[nn.Module] = Conv1D, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.c_fc = conv(h, d)
        self.c_proj = conv(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


@torch.fx.wrap
def two_layer_block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Like torchvision's Swin attention: one wrapped call takes the input and two layers' weights."""
    return F.linear(F.relu(F.linear(x, w1)), w2)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16, bias=False)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return two_layer_block(x, self.fc1.weight, self.fc2.weight)


SPEC = {
    "activations": [
        {"target": "c_proj", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.5}
    ]
}


def _check_conv1d_input_mask(model: nn.Module, x: torch.Tensor, **kwargs: object) -> None:
    sgm = fxs.sparsify_graph(model, SPEC, **kwargs)
    observer = sgm.get_submodule(sgm._fxs.targets["c_proj:input"].observer)
    obs_node = next(n for n in sgm.graph.nodes if n.target == observer.name)
    assert obs_node.args[0].name != "c_proj_bias"  # on the input operand of addmm, not the bias
    sgm(x)
    sgm.step()
    mask = sgm.masks()["c_proj:input"]
    assert mask.shape == (16,) and int((~mask).sum()) == 8  # one entry per input feature of c_proj
    hidden = F.gelu(model.c_fc(x))
    expected = torch.addmm(model.c_proj.bias, (hidden * mask).view(-1, 16), model.c_proj.weight).view(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(sgm(x), expected)
        torch.testing.assert_close(sgm.squash()(x), expected)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_gpt2_conv1d_addmm_masks_the_input_operand(capture: str) -> None:
    x = torch.randn(3, 5, 8)
    _check_conv1d_input_mask(GPT2MLP().eval(), x, capture=capture, example_inputs=(x,))


def test_transformers_conv1d_masks_the_input_operand() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    x = torch.randn(3, 5, 8)
    model = GPT2MLP(pytorch_utils.Conv1D).eval()
    for conv in (model.c_fc, model.c_proj):
        nn.init.normal_(conv.bias, std=0.1)
    _check_conv1d_input_mask(model, x, capture="export", example_inputs=(x,))


def test_wrapped_function_taking_two_weights_is_refused_not_misplaced() -> None:
    spec = {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]}
    with pytest.raises(ValueError, match=r"'fc2'.*input is not visible.*two_layer_block.*capture='export'"):
        fxs.sparsify_graph(Wrapped(), spec, capture="fx")
    # the way out the error names: export traces into the function, where fc2's input is the relu
    model, x = Wrapped(), torch.randn(5, 8)
    sgm = fxs.sparsify_graph(model, spec, capture="export", example_inputs=(x,))
    sgm(x)
    sgm.step()
    mask = sgm.masks()["fc2:input"]
    assert mask.shape == (16,)
    expected = F.linear(F.relu(F.linear(x, model.fc1.weight)) * mask, model.fc2.weight)
    with torch.no_grad():
        torch.testing.assert_close(sgm(x), expected)


def test_matmul_with_a_transposed_weight_masks_the_other_operand() -> None:
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = Proj()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model, x = Net(), torch.randn(3, 6)
    sgm = fxs.sparsify_graph(model, {"activations": [{"target": "proj", "mask": "l1_unstructured", "sparsity": 2}]})
    sgm(x)
    sgm.step()
    mask = sgm.masks()["proj:input"]
    assert mask.shape == (6,)
    torch.testing.assert_close(sgm(x), (x * mask) @ model.proj.weight.T)


class WithIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.gate = nn.Identity()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.act(self.fc1(x))))


@pytest.mark.parametrize("layer", ["gate", "act"])
def test_activation_rule_on_a_layer_without_weight(layer: str) -> None:
    model, x = WithIdentity().eval(), torch.randn(6, 8)
    spec = {"activations": [{"target": layer, "aggregate": "abs_sum", "mask": "l1_unstructured", "sparsity": 0.25}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm(x)
    sgm.step()
    mask = sgm.masks()[f"{layer}:input"]
    assert mask.shape == (16,) and int((~mask).sum()) == 4
    h = model.fc1(x)
    h = torch.relu(h * mask) if layer == "act" else torch.relu(h) * mask
    expected = model.fc2(h)
    with torch.no_grad():
        torch.testing.assert_close(sgm(x), expected)
        torch.testing.assert_close(sgm.squash()(x), expected)
    assert "kept as constant" in sgm.report()  # no weight to fold into


def test_layer_without_weight_traced_through_is_a_clear_error() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.block(x))

    spec = {"activations": [{"target": "block", "mask": "dense"}]}
    with pytest.raises(ValueError, match=r"'block' is never called as a module.*leaf_modules=\['block'\]"):
        fxs.sparsify_graph(Net(), spec)
    sgm = fxs.sparsify_graph(Net(), spec, leaf_modules=["block"])  # the way out works
    assert "block:input" in sgm.masks()
