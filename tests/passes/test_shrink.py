"""``squash(shrink=True)`` (SPEC §10): smaller tensors, outputs equal to the masked module, export works."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

from _channel_models import (
    MLP,
    Block,
    MobileNetV2Mini,
    ResidualCNN,
    random_residual_cnn,
    random_residual_cnn_cases,
    randomise_norms,
)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check(model: nn.Module, spec: dict[str, Any], x: torch.Tensor, capture: str = "auto") -> torch.fx.GraphModule:
    """sparsify → step → shrink: outputs equal the masked module's, fewer parameters, export accepts it."""
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture=capture)
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    assert _params(small) < _params(model)
    assert list(small.state_dict()) == list(model.state_dict())  # original keys, smaller shapes
    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x))
    return small


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_cnn_with_residual_depthwise_and_se_shrinks_exactly(capture: str) -> None:
    model = randomise_norms(ResidualCNN().eval())
    spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}, {"target": "se1", "sparsity": 0.5}]}
    small = _check(model, spec, torch.randn(2, 3, 8, 8), capture)
    sd = small.state_dict()
    assert sd["c1.weight"].shape == (8, 3, 3, 3) and sd["b1.running_var"].shape == (8,)
    assert sd["dw.weight"].shape == (8, 1, 3, 3) and sd["pw.weight"].shape == (12, 8, 1, 1)
    assert sd["se1.weight"].shape == (3, 12) and sd["fc.weight"].shape == (10, 48)
    if capture == "fx":  # module attributes follow the tensors
        assert (small.dw.groups, small.dw.in_channels, small.b1.num_features) == (8, 8, 8)
        assert (small.fc.in_features, small.se2.out_features) == (48, 12)


def test_shrunk_parameter_count_is_what_the_report_announced() -> None:
    model = randomise_norms(ResidualCNN().eval())
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}, example_inputs=(torch.randn(2, 3, 8, 8),)
    )
    sgm.step()
    small = sgm.squash(shrink=True)
    assert f"keeps {_params(small):,} of {_params(model):,} parameters" in sgm.report()


def test_mlp_shrinks() -> None:
    _check(MLP(), {"channels": [{"target": "re:fc[12]", "sparsity": 0.5, "global": True}]}, torch.randn(3, 20))


@pytest.mark.parametrize(
    "capture,kv,sdpa", [("fx", 4, True), ("export", 4, False), ("fx", 2, False), ("export", 2, True)]
)
def test_attention_heads_and_gqa_shrink(capture: str, kv: int, sdpa: bool) -> None:
    model = Block(kv=kv, sdpa=sdpa).eval()
    heads = {4: 0.5, 2: 2}[kv]
    spec = {"channels": [{"target": "attn", "heads": heads}, {"target": "up", "sparsity": 0.5}]}
    small = _check(model, spec, torch.randn(2, 5, 32), capture)
    sd = small.state_dict()
    assert sd["up.weight"].shape == (32, 32) and sd["down.weight"].shape == (32, 32)
    kept_q = 2
    assert sd["attn.q.weight"].shape == (kept_q * 8, 32) and sd["attn.o.weight"].shape == (32, kept_q * 8)
    assert sd["attn.k.weight"].shape[0] == 8 * (kv * kept_q // 4)


def test_nothing_pruned_shrinks_nothing() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "fc1", "sparsity": 0.5}]}, example_inputs=(torch.randn(2, 20),)
    )
    small = sgm.squash(shrink=True)  # before step(): every mask keeps everything
    assert _params(small) == _params(model)
    assert sgm.squash().state_dict()["fc1.weight"].shape == (64, 20)  # shrink=False keeps the shapes


def test_transformer_encoder_export_capture_ffn_channels() -> None:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    small = _check(model, {"channels": [{"target": "re:layers\\.\\d+\\.linear1", "sparsity": 0.5}]}, x, "export")
    assert small.state_dict()["layers.0.linear1.weight"].shape == (32, 32)
    # heads of nn.MultiheadAttention: the attention is captured as one op, its heads one group (more in
    # tests/passes/test_shrink_attention.py)
    small = _check(model, {"channels": [{"target": "layers.0.self_attn", "heads": 0.5}]}, x, "export")
    assert small.state_dict()["layers.0.self_attn.in_proj_weight"].shape == (48, 32)


def test_training_keeps_pruned_channels_pruned_and_shrink_stays_exact() -> None:
    model = randomise_norms(ResidualCNN())
    x = torch.randn(4, 3, 8, 8)
    sgm = fxs.sparsify_graph(model, {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}, example_inputs=(x,))
    sgm.step()
    opt = torch.optim.SGD(sgm.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        sgm(x).square().mean().backward()
        opt.step()
    sgm.eval()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)


@random_residual_cnn_cases
def test_random_channel_masks_on_random_residual_cnns_shrink_exactly(
    widths: list[int], residual: list[bool], sparsity: float, seed: int
) -> None:
    model = random_residual_cnn(widths, residual, seed)
    x = torch.randn(2, 3, 6, 6)
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "re:convs\\.\\d+", "sparsity": sparsity, "p": 1}]}, example_inputs=(x,)
    )
    with torch.no_grad():  # random masks: shuffle the weights so the ranking differs from run to run
        for p in sgm.parameters():
            p.copy_(torch.randn_like(p) * p.abs().mean().clamp_min(0.1))
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    kept = {int(sgm.masks()[f"convs.{i}.bias"].sum()) for i in range(len(widths))}
    assert {small.state_dict()[f"convs.{i}.bias"].shape[0] for i in range(len(widths))} == kept


def test_deepcopy_and_state_dict_round_trip_keep_the_shrink() -> None:
    model = randomise_norms(ResidualCNN().eval())
    x = torch.randn(2, 3, 8, 8)
    spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    sgm.step()
    expected = sgm.squash(shrink=True).state_dict()
    fresh = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    fresh.load_state_dict(sgm.state_dict())  # masks restored: the same channels go
    for copy_ in (fresh, copy.deepcopy(sgm)):
        got = copy_.squash(shrink=True).state_dict()
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
        torch.testing.assert_close(got["pw.weight"], expected["pw.weight"])


def test_mobilenet_v2_blocks_shrink() -> None:
    model = randomise_norms(MobileNetV2Mini().eval())
    small = _check(model, {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}, torch.randn(2, 3, 16, 16), "fx")
    get = small.get_submodule  # expand 64 -> 32, its depthwise conv follows with groups=32
    assert get("features.1.conv.0").out_channels == 32 and get("features.1.conv.3").groups == 32
    assert get("features.1.conv.3").in_channels == 32
    assert get("features.3.conv.6").out_channels == 12  # 24 -> 12, shared by the residual pair


@pytest.mark.parametrize(
    "spec",
    [
        {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]},
        {"weights": [{"target": "fc2", "method": "ln_structured", "sparsity": 0.5, "dim": 1}]},
    ],
    ids=["activation-mask", "ln_structured-columns"],
)
def test_zero_columns_made_by_other_rules_shrink_their_producer(spec: dict[str, Any]) -> None:
    x = torch.randn(8, 20)
    model = MLP()
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    sgm(x)
    sgm.step()
    assert "other rules' zeros" in sgm.shrink_plan()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-5, rtol=1e-5)
    sd = small.state_dict()
    assert sd["fc1.weight"].shape == (32, 20) and sd["fc1.bias"].shape == (32,) and sd["fc2.weight"].shape == (48, 32)
    assert sgm.squash().state_dict()["fc1.weight"].shape == (64, 20)  # shrink=False leaves them
    plain = fxs.sparsify_graph(model, spec)  # without example inputs the fx capture has no shapes: no plan, no error
    assert plain._fxs.channels is None


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_squash_into_shrinks_a_depthwise_convolution_of_the_users_model(capture: str) -> None:
    """An export graph holds a depthwise convolution's ``groups`` as a call argument: squash_into(shrink=True)
    resized the user's dw.weight but left ``dw.groups`` (a RuntimeError at the next forward, timm's MobileViT)."""
    torch.manual_seed(0)
    model, x = randomise_norms(ResidualCNN().eval()), torch.randn(2, 3, 8, 8)
    spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture=capture)
    sgm.eval()
    sgm.step()
    mine = copy.deepcopy(model)
    assert sgm.squash_into(mine, shrink=True) is mine
    assert (mine.dw.weight.shape[0], mine.dw.groups, mine.dw.in_channels, mine.dw.out_channels) == (8, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), sgm(x), atol=1e-5, rtol=1e-5)
