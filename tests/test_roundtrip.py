"""Round trips (SPEC §14): taking over torch's pruning tools, initial masks, squash_into, to_torch_prune."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

import fx_sparsify as fxs

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def test_prune_hooks_are_taken_over() -> None:
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.25)
    prune.l1_unstructured(model[2], "weight", amount=0.25)  # iterative: a PruningContainer
    expected = {"0.weight": model[0].weight_mask.bool(), "2.weight": model[2].weight_mask.bool()}
    with torch.no_grad():
        ref = model(X)
    sgm = fxs.sparsify_graph(model, SPEC)
    assert hasattr(model[0], "weight_orig") and model[0]._forward_pre_hooks  # the user's model is unchanged
    with torch.no_grad():
        torch.testing.assert_close(sgm(X), ref)
    masks = sgm.masks()
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask)
        assert sgm._fxs.targets[name].param == name  # the plain name
    assert torch.equal(sgm.get_parameter("0.weight"), model[0].weight_orig)  # the original values, unmasked
    report = sgm.report()
    assert report.count("(adopted)") == 2 and "| 4.weight " in report
    sgm.step()  # a pruned entry stays pruned
    for name, mask in expected.items():
        assert not bool((sgm.masks()[name] & ~mask).any())
    with torch.no_grad():
        torch.testing.assert_close(sgm.squash()(X), sgm(X))


def test_global_unstructured_is_taken_over() -> None:
    model = _mlp()
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], prune.L1Unstructured, amount=0.6)
    with torch.no_grad():
        ref = model(X)
    sgm = fxs.sparsify_graph(model, {"global": [{"targets": ["0", "2"], "method": "l1_unstructured", "sparsity": 0.6}]})
    with torch.no_grad():
        torch.testing.assert_close(sgm(X), ref)
    assert torch.equal(sgm.masks()["0.weight"], model[0].weight_mask.bool())


def test_ao_fake_sparsity_is_taken_over() -> None:
    model = _mlp()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    expected = {n: model.get_submodule(n[0]).parametrizations.weight[0].mask.bool() for n in ("0.weight", "2.weight")}
    with torch.no_grad():
        ref = model(X)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "re:[02]", "method": "2:4"}]})
    assert not any(type(m).__name__.startswith("Parametrized") for m in sgm.modules())
    with torch.no_grad():
        torch.testing.assert_close(sgm(X), ref)
    for name, mask in expected.items():
        assert torch.equal(sgm.masks()[name], mask)
    assert sgm.report().count("(adopted)") == 2
    assert torch.equal(sgm.get_parameter("0.weight"), model[0].parametrizations.weight.original)


def test_an_adopted_mask_no_rule_selects_is_an_error() -> None:
    model = _mlp()
    prune.l1_unstructured(model[4], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"'4.weight' carries a torch.nn.utils.prune mask.*prune.remove"):
        fxs.sparsify_graph(model, {"weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5}]})
    assert hasattr(model[4], "weight_orig")


def test_initial_masks() -> None:
    model = _mlp()
    mask = torch.rand(16, 8) > 0.3
    sgm = fxs.sparsify_graph(model, SPEC, masks={"0.weight": mask})
    assert torch.equal(sgm.masks()["0.weight"], mask)
    assert "l1_unstructured (initial mask)" in sgm.report()
    with torch.no_grad():
        torch.testing.assert_close(
            sgm(X),
            model[4](torch.relu(model[2](torch.relu(nn.functional.linear(X, model[0].weight * mask, model[0].bias))))),
        )
    float_mask = fxs.sparsify_graph(model, SPEC, masks={"0.weight": mask.float()}).masks()["0.weight"]
    assert torch.equal(float_mask, mask)


@pytest.mark.parametrize(
    "masks,error,match",
    [
        ({"0.bias": torch.ones(16)}, KeyError, "'0.bias' is not a weight target"),
        ({"0.weight": torch.ones(8, 16)}, ValueError, r"shape \(8, 16\) does not match"),
        ({"0.weight": torch.full((16, 8), 0.5)}, ValueError, "only 0 and 1"),
        ({"0.weight": [[1]]}, TypeError, "expected a tensor"),
        ([("0.weight", torch.ones(16, 8))], TypeError, "masks must be a dict"),
    ],
)
def test_initial_mask_errors(masks: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        fxs.sparsify_graph(_mlp(), SPEC, masks=masks)  # type: ignore[arg-type]


def test_to_torch_prune_and_back() -> None:
    model = _mlp()
    sgm = fxs.sparsify_graph(model, SPEC)
    sgm.step()
    eager = _mlp()
    eager.load_state_dict(model.state_dict())
    assert sgm.to_torch_prune(eager) is eager
    for name in ("0", "2", "4"):
        module = eager.get_submodule(name)
        assert prune.is_pruned(module) and torch.equal(module.weight_mask.bool(), sgm.masks()[f"{name}.weight"])
    with torch.no_grad():
        torch.testing.assert_close(eager(X), sgm(X))
    again = fxs.sparsify_graph(eager, SPEC)  # and taken over again: the same masks
    for name, mask in sgm.masks().items():
        assert torch.equal(again.masks()[name], mask)
    with pytest.raises(ValueError, match="already pruned"):
        sgm.to_torch_prune(eager)


def test_squash_into_keeps_the_users_model_and_its_parameters() -> None:
    model = _mlp()
    sgm = fxs.sparsify_graph(model, SPEC)
    sgm.step()
    own = _mlp()
    params = {n: p for n, p in own.named_parameters()}
    assert sgm.squash_into(own) is own
    assert all(p is params[n] for n, p in own.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(own(X), sgm(X))
    assert float((own[0].weight == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"shapes differ: 0.weight"):
        sgm.squash_into(nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    with pytest.raises(TypeError, match="your eager nn.Module"):
        sgm.squash_into("model")  # type: ignore[arg-type]


def test_squash_into_refuses_an_activation_mask_it_cannot_fold() -> None:
    class Add(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.fc(x * 2)  # two call sites: the mask stays a multiply

    sgm = fxs.sparsify_graph(Add(), {"activations": [{"target": "fc", "mask": "threshold", "threshold": 0.1}]})
    sgm(X)
    sgm.step()
    with pytest.raises(ValueError, match="activation mask.*'fc:input'.*cannot be folded"):
        sgm.squash_into(Add())


def test_take_over_in_place_rewrites_the_users_model() -> None:
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.bool()
    original = model[0].weight_orig
    sgm = fxs.sparsify_graph(model, SPEC, inplace=True)
    assert not prune.is_pruned(model) and model[0].weight is original  # inplace: the model itself is taken over
    assert sgm.get_parameter("0.weight") is original
    assert torch.equal(sgm.masks()["0.weight"], mask)


def test_explicit_masks_win_over_adopted_ones() -> None:
    model = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    keep = torch.ones(16, 8, dtype=torch.bool)
    sgm = fxs.sparsify_graph(model, SPEC, masks={"0.weight": keep})
    assert bool(sgm.masks()["0.weight"].all())
    assert "l1_unstructured (initial mask)" in sgm.report()
