"""Activation sparsification: observers, masks, folding, Wanda (SPEC §5, §6) against ActivationSparsifier."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import ActivationSparsifier

import fx_sparsify as fxs
from fx_sparsify import ops

from helpers import assert_unchanged, count, fxs_nodes, snapshot
from models import MLP, KeywordCall, transformer_encoder


def agg_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=0)


def keep_above(t: torch.Tensor, threshold: float) -> torch.Tensor:
    return (t.abs() >= threshold).float()


def batches(n: int = 4, batch: int = 8, width: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(batch, width, generator=g) for _ in range(n)]


def reference_masks(model: nn.Module, layer: str, data: list[torch.Tensor], **config: object) -> object:
    ref_model = copy.deepcopy(model)
    sparsifier = ActivationSparsifier(ref_model)
    sparsifier.register_layer(ref_model.get_submodule(layer), **config)
    for x in data:
        ref_model(x)
    sparsifier.step()
    return sparsifier.get_mask(layer), sparsifier, ref_model


@pytest.mark.parametrize("use_names", [False, True])
def test_masks_equal_reference(use_names: bool) -> None:
    model = MLP()
    data = batches()
    ref_mask, sparsifier, ref_model = reference_masks(
        model, "fc2", data, aggregate_fn=agg_sum, reduce_fn=reduce_mean, mask_fn=keep_above, threshold=0.8
    )
    if use_names:
        rule = {"target": "fc2", "aggregate": "sum", "reduce": "mean", "mask": "threshold", "threshold": 0.8}
    else:
        rule = {"target": "fc2", "aggregate": agg_sum, "reduce": reduce_mean, "mask": keep_above, "threshold": 0.8}
    sgm = fxs.sparsify_graph(model, {"activations": [rule]})
    for x in data:
        sgm(x)
    sgm.step()
    mask = sgm.masks()["fc2:input"]
    assert mask.shape == ref_mask.shape == (32,)
    assert torch.equal(mask, ref_mask.bool())
    assert 0 < int(mask.sum()) < 32
    # outputs equal the reference's sparsify hook
    sparsifier.squash_mask()
    x = torch.randn(5, 16)
    torch.testing.assert_close(sgm(x), ref_model(x))


def test_per_feature_masks_equal_reference() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = Seq()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    config = dict(
        aggregate_fn=agg_sum, reduce_fn=reduce_mean, mask_fn=keep_above, features=[0, 3], feature_dim=1, threshold=0.3
    )
    ref_mask, sparsifier, ref_model = reference_masks(model, "fc", data, **config)
    sgm = fxs.sparsify_graph(
        model,
        {
            "activations": [
                {
                    "target": "fc",
                    "aggregate": "sum",
                    "reduce": "mean",
                    "mask": "threshold",
                    "threshold": 0.3,
                    "features": [0, 3],
                    "feature_dim": 1,
                }
            ]
        },
    )
    for x in data:
        sgm(x)
    sgm.step()
    ours = sgm.masks()["fc:input"]
    assert isinstance(ours, list) and len(ours) == 2
    for a, b in zip(ours, ref_mask):
        assert torch.equal(a, b.bool())
    sparsifier.squash_mask()
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(sgm(x), ref_model(x.clone()))  # the reference edits its input in place
    torch.testing.assert_close(sgm.squash()(x), sgm(x))
    assert count(sgm.squash(), torch.mul) == 1  # per-feature masks stay as one constant multiply
    masked = ops.mask_activation(x, sgm.fc_input_mask, (0, 3), 1)
    torch.testing.assert_close(masked[:, [1, 2, 4]], x[:, [1, 2, 4]], rtol=0, atol=0)  # other features untouched


def test_mask_broadcasts_over_batch_and_is_not_reset_by_forward() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]})
    for x in batches(batch=8):
        sgm(x)
    for x in batches(batch=3):  # sum-like aggregates accept any calibration batch size
        sgm(x)
    sgm.step()
    mask = sgm.masks()["fc2:input"].clone()
    assert int((~mask).sum()) == 16  # half the 32 features
    for b in (1, 7, 20):
        assert sgm(torch.randn(b, 16)).shape == (b, 8)
    assert torch.equal(sgm.masks()["fc2:input"], mask)  # (the reference resets its mask on the next forward)


def test_mask_is_applied_after_step() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(model, {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]})
    x = torch.randn(4, 16)
    torch.testing.assert_close(sgm(x), model(x))  # before step: keeps everything
    sgm.step()
    eager = copy.deepcopy(model)
    keep = sgm.masks()["fc2:input"].float()
    h = torch.relu(eager.fc1(x)) * keep
    torch.testing.assert_close(sgm(x), eager.head(torch.relu(eager.fc2(h))))


@pytest.mark.parametrize(
    "weight_rule",
    [
        None,
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.3},
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.3, "gradient": "supermask"},
    ],
)
def test_squash_folds_into_linear_columns(weight_rule: dict | None) -> None:
    model = MLP()  # the report predicts the fold also when the layer's weight has its own mask node
    sgm = fxs.sparsify_graph(
        model,
        {
            "activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}],
            "weights": [weight_rule] if weight_rule else [],
        },
    )
    for x in batches():
        sgm(x)
    sgm.step()
    assert "folded" in next(line for line in sgm.report().splitlines() if "fc2:input" in line)
    squashed = sgm.squash()
    assert count(squashed, torch.mul) == 0 and not fxs_nodes(squashed)
    assert not any("observer" in n for n, _ in squashed.named_modules())
    pruned = ~sgm.masks()["fc2:input"]
    assert torch.all(squashed.fc2.weight[:, pruned] == 0)
    x = torch.randn(6, 16)
    torch.testing.assert_close(squashed(x), sgm(x))
    fresh = MLP()
    fresh.load_state_dict(squashed.state_dict())
    torch.testing.assert_close(fresh(x), sgm(x))


def test_squash_folds_into_conv_input_channels_including_depthwise() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = nn.Conv2d(8, 4, 1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.grouped(torch.relu(self.dw(torch.relu(self.c1(x)))))

    model = Net()
    # per-channel statistic: sum over batch and space via a callable reduce, top half of channels kept
    rule = {
        "target": "re:dw|grouped",
        "reduce": lambda t: t.abs().sum(dim=(0, 2, 3)).view(-1, 1, 1),
        "mask": "l1_unstructured",
        "sparsity": 0.5,
    }
    sgm = fxs.sparsify_graph(model, {"activations": [rule]})
    for _ in range(2):
        sgm(torch.randn(2, 3, 8, 8))
    sgm.step()
    squashed = sgm.squash()
    assert count(squashed, torch.mul) == 0
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(squashed(x), sgm(x))
    pruned = ~sgm.masks()["dw:input"].flatten()
    assert torch.all(squashed.dw.weight[pruned] == 0)
    torch.export.export(squashed, (x,))


def test_mask_that_cannot_fold_stays_as_a_named_constant() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = Tokens()
    # reduce "mean" over the batch of (B, T, F) leaves a (T, F) mask that varies over T: not a column mask
    sgm = fxs.sparsify_graph(model, {"activations": [{"target": "fc", "mask": "l1_unstructured", "sparsity": 0.5}]})
    sgm(torch.randn(3, 5, 4))
    sgm.step()
    assert "kept as constant" in sgm.report()
    squashed = sgm.squash()
    assert count(squashed, torch.mul) == 1 and not fxs_nodes(squashed)
    assert "fc_input_mask" in dict(squashed.named_buffers())
    assert set(squashed.state_dict()) == set(model.state_dict())  # the constant is not persistent
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(squashed(x), sgm(x))
    ep = fxs.export(squashed, (x,))
    torch.testing.assert_close(ep.module()(x), sgm(x))


def test_export_capture_layers() -> None:
    model = transformer_encoder()
    x = torch.randn(2, 5, 16)
    rule = {
        "target": "re:layers\\.\\d+\\.linear2",
        "reduce": lambda t: t.abs().sum(dim=(0, 1)),
        "mask": "l1_unstructured",
        "sparsity": 0.25,
    }
    sgm = fxs.sparsify_graph(model, {"activations": [rule]}, example_inputs=(x,))
    assert sgm._fxs.capture == "export" and count(sgm, ops.mask_activation) == 2
    sgm(x)
    sgm.step()
    squashed = sgm.squash()
    assert count(squashed, ops.mask_activation) == 0
    torch.testing.assert_close(squashed(x), sgm(x))
    assert torch.all(squashed.get_parameter("layers.0.linear2.weight")[:, ~sgm.masks()["layers.0.linear2:input"]] == 0)


def test_wanda_scores_equal_hand_computation() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(
        model, {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"}]}
    )
    data = batches(n=3)
    for x in data:
        sgm(x)
    sgm.step()
    h = torch.cat([torch.relu(model.fc1(x)) for x in data]).detach()
    scores = model.fc2.weight.detach().abs() * h.norm(dim=0)
    expected = torch.ones_like(scores, dtype=torch.bool)  # per output row, as the Wanda paper (SPEC §16)
    expected.scatter_(1, scores.argsort(dim=1)[:, : scores.shape[1] // 2], False)
    assert torch.equal(sgm.masks()["fc2.weight"], expected)
    assert not any("observer" in n for n, _ in sgm.squash().named_modules())


def test_observer_statistics_and_masks_round_trip_through_state_dict() -> None:
    spec = {"activations": [{"target": "fc2", "mask": "l1_unstructured", "sparsity": 0.5}]}
    model = MLP()
    sgm = fxs.sparsify_graph(model, spec)
    for x in batches():
        sgm(x)
    sgm.step()
    sgm(torch.randn(8, 16))  # statistics of the next round
    buf = io.BytesIO()
    torch.save(sgm.state_dict(), buf)
    fresh = fxs.sparsify_graph(model, spec)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh.masks()["fc2:input"], sgm.masks()["fc2:input"])
    torch.testing.assert_close(fresh.fc2_input_observer.stat, sgm.fc2_input_observer.stat)
    fresh.step()
    sgm.step()
    assert torch.equal(fresh.masks()["fc2:input"], sgm.masks()["fc2:input"])


def test_observers_keep_no_autograd_graph() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"activations": [{"target": "fc2", "mask": "threshold", "threshold": 0.1}]})
    sgm(torch.randn(4, 16)).sum().backward()
    assert not sgm.fc2_input_observer.stat.requires_grad


def test_step_without_data_warns_and_keeps_the_mask() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"activations": [{"target": "fc2", "mask": "threshold", "threshold": 0.1}]})
    with pytest.warns(UserWarning, match="saw no forward pass"):
        sgm.step()
    assert bool(sgm.masks()["fc2:input"].all())


def test_per_sample_aggregate_refuses_a_changed_batch_shape() -> None:
    sgm = fxs.sparsify_graph(
        MLP(), {"activations": [{"target": "fc2", "aggregate": "max", "mask": "threshold", "threshold": 0.1}]}
    )
    sgm(torch.randn(4, 16))
    with pytest.raises(ValueError, match="batches of one shape"):
        sgm(torch.randn(5, 16))


@pytest.mark.parametrize(
    "rule, exc, match",
    [
        ({"target": "fc9", "mask": "dense"}, ValueError, "selects no layer"),
        ({"target": "fc2", "mask": "dense", "features": [1]}, ValueError, "go together"),
        ({"target": "fc2", "aggregate": 5, "mask": "dense"}, TypeError, "callable"),
        ({"target": "fc2", "aggregate": "median", "mask": "dense"}, ValueError, "unknown aggregate"),
        ({"target": "fc2", "mask": "no_such_method"}, KeyError, "unknown mask method"),
        ({"target": "fc2", "mask": "threshold", "treshold": 0.1}, TypeError, "did you mean 'threshold'"),
    ],
)
def test_bad_activation_rules(rule: dict, exc: type, match: str) -> None:
    model = MLP()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fxs.sparsify_graph(model, {"activations": [rule]})
    assert_unchanged(model, before)


def test_wanda_on_a_non_linear_weight_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="nn.Linear"):
        fxs.sparsify_graph(
            model, {"weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"}]}
        )


def test_example_input_check_leaves_no_statistics_or_running_stats() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).train()
    sgm = fxs.sparsify_graph(
        model,
        {"activations": [{"target": "2", "mask": "threshold", "threshold": 0.1}]},
        example_inputs=(torch.randn(5, 4),),
    )
    observer = sgm.get_submodule("2_input_observer")
    assert observer.batches == 0 and observer.stat.numel() == 0
    torch.testing.assert_close(sgm.get_buffer("1.running_mean"), model[1].running_mean)


def test_missing_importance_scores_tensor_is_a_clear_error() -> None:
    model = MLP()
    before = snapshot(model)
    with pytest.raises(KeyError, match="register them with model.register_buffer"):
        fxs.sparsify_graph(
            model, {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "scores": "nope"}]}
        )
    assert_unchanged(model, before)


def test_layer_called_with_its_input_by_keyword() -> None:
    model = KeywordCall(nn.Linear(16, 4))
    sgm = fxs.sparsify_graph(
        model,
        {"activations": [{"target": "layer", "aggregate": "abs_sum", "mask": "l1_unstructured", "sparsity": 0.5}]},
    )
    data = batches()
    for x in data:
        sgm(x)
    sgm.step()
    keep = sgm.masks()["layer:input"]
    assert int((~keep).sum()) == 8
    x = data[0]
    torch.testing.assert_close(sgm(x), model(x * keep))
    torch.testing.assert_close(sgm.squash()(x), sgm(x))


def test_example_inputs_record_shapes_so_per_feature_masks_squash() -> None:
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = {
        "activations": [{"target": "2", "mask": "threshold", "threshold": 0.1, "features": [0, 2], "feature_dim": 1}]
    }
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(torch.randn(5, 16),))
    assert sgm.get_submodule("2_input_observer").input_shape == (5, 6)
    x = torch.randn(5, 16)
    torch.testing.assert_close(sgm.squash()(x), sgm(x))  # squash before any step: all-keep masks
