"""Training with masks (SPEC §8): gradient modes, optimizers, schedules, supermask, in-place mode."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

import fx_sparsify as fxs

from helpers import fxs_nodes
from models import MLP

L1 = {"method": "l1_unstructured", "sparsity": 0.5}
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
}


def _data(n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(n)]


def _train(
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    every: Callable[[], None] | None = None,
) -> None:
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(module(x), y).backward()
        opt.step()
        if every is not None:
            every()


def _effective(sgm: fxs.SparseGraphModule, name: str) -> torch.Tensor:
    return sgm.get_parameter(name).detach() * sgm.masks()[name]


# --- gradient modes -------------------------------------------------------------------------------
def _grads(gradient: str) -> tuple[fxs.SparseGraphModule, dict[str, torch.Tensor | None]]:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc2", **L1, "gradient": gradient}]})
    sgm.step()
    x = torch.randn(32, 16)
    sgm(x).pow(2).sum().backward()
    return sgm, {n: p.grad for n, p in sgm.named_parameters()}


def test_gradient_mask_zeroes_pruned_weights() -> None:
    sgm, grads = _grads("mask")
    keep = sgm.masks()["fc2.weight"]
    assert grads["fc2.weight"] is not None
    assert torch.all(grads["fc2.weight"][~keep] == 0)
    assert grads["fc2.weight"][keep].abs().sum() > 0
    assert count_nonzero(grads["fc1.weight"]) > 0  # upstream layers still learn


def count_nonzero(t: torch.Tensor | None) -> int:
    assert t is not None
    return int((t != 0).sum())


def test_gradient_ste_is_dense() -> None:
    sgm, grads = _grads("ste")
    keep = sgm.masks()["fc2.weight"]
    g = grads["fc2.weight"]
    assert g is not None and (g[~keep] != 0).any()
    # the straight-through gradient equals the gradient of a dense layer holding the masked weights
    x = torch.randn(32, 16)
    ref = copy.deepcopy(sgm.squash())
    sgm.zero_grad()
    sgm(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(sgm.get_parameter("fc2.weight").grad, ref.get_parameter("fc2.weight").grad)


def test_gradient_supermask_trains_scores_not_weights() -> None:
    sgm, grads = _grads("supermask")
    scores = [n for n in grads if n.endswith(".scores")]
    assert len(scores) == 1
    assert grads["fc2.weight"] is None or torch.all(grads["fc2.weight"] == 0)
    assert count_nonzero(grads[scores[0]]) > 0
    assert sgm.sparsity()["fc2.weight"] == pytest.approx(0.5)


def test_gradient_joint_trains_weights_and_scores() -> None:
    sgm, grads = _grads("joint")
    (scores,) = [n for n in grads if n.endswith(".scores")]
    keep = sgm.masks()["fc2.weight"]
    g = grads["fc2.weight"]
    assert g is not None and (g[keep] != 0).any()
    assert torch.all(g[~keep] == 0)  # the weight's gradient is masked
    assert count_nonzero(grads[scores]) > 0
    # the scores' gradient reaches pruned entries too (straight through)
    assert (grads[scores][~keep] != 0).any()


@pytest.mark.parametrize(
    "shorthand, gradient", [("TOPK{0.5}(U)", "ste"), ("TOPK{0.5}(M)", "mask"), ("TOPK{0.5}", "mask")]
)
def test_shorthand_suffix_sets_gradient(shorthand: str, gradient: str) -> None:
    spec = fxs.SparsitySpec.from_dict({"weights": [{"target": "fc2", "method": shorthand}]})
    assert spec.weights[0].gradient == gradient


# --- pruned weights stay zero through optimizers ---------------------------------------------------
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_pruned_weights_stay_zero_graph_mode(optimizer: str) -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "type:Linear", **L1}]})
    sgm.step()
    masks = {k: v.clone() for k, v in sgm.masks().items()}
    _train(sgm, OPTIMIZERS[optimizer](sgm.parameters()), _data())
    squashed = sgm.squash()
    for name, keep in masks.items():
        assert torch.equal(sgm.masks()[name], keep)  # training never moves a mask
        assert torch.all(_effective(sgm, name)[~keep] == 0)
        assert torch.all(squashed.get_parameter(name)[~keep] == 0)
        assert (squashed.get_parameter(name)[keep] != 0).all()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_inplace_keep_sparse_keeps_raw_parameters_zero(optimizer: str) -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), {"mode": "inplace", "weights": [{"target": "type:Linear", **L1}]})
    assert not fxs_nodes(sgm) and "mask" not in sgm.code  # no multiply in the training graph
    sgm.step()
    opt = OPTIMIZERS[optimizer](sgm.parameters())
    handle = sgm.keep_sparse(opt)
    for name, keep in sgm.masks().items():
        assert torch.all(sgm.get_parameter(name)[~keep] == 0)  # step() zeroes in place
    _train(sgm, opt, _data())
    for name, keep in sgm.masks().items():
        w = sgm.get_parameter(name)
        assert torch.all(w[~keep] == 0), name
        assert (w[keep] != 0).all()
    handle.remove()  # detached: the optimizer moves pruned weights again (dense gradient, momentum)
    _train(sgm, opt, _data(2, seed=1))
    assert any((sgm.get_parameter(n)[~k] != 0).any() for n, k in sgm.masks().items())


def test_keep_sparse_requires_inplace_mode() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    with pytest.raises(ValueError, match="inplace"):
        sgm.keep_sparse(torch.optim.SGD(sgm.parameters(), lr=0.1))


# --- in-place mode equals graph mode ---------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd_momentum_wd", "adam"])
def test_inplace_mode_equals_graph_mode(optimizer: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    rules = [{"target": "type:Linear", **L1}, {"target": "head", "method": "2:4"}]
    graph = fxs.sparsify_graph(model, {"weights": rules})
    inplace = fxs.sparsify_graph(model, {"mode": "inplace", "weights": rules})
    opts = [OPTIMIZERS[optimizer](m.parameters()) for m in (graph, inplace)]
    inplace.keep_sparse(opts[1])
    data = _data(8)
    for i in range(0, len(data), 2):  # a step() every two iterations: masks follow the trained weights
        graph.step()
        inplace.step()
        _train(graph, opts[0], data[i : i + 2])
        _train(inplace, opts[1], data[i : i + 2])
        for name, keep in graph.masks().items():
            assert torch.equal(inplace.masks()[name], keep)
            torch.testing.assert_close(inplace.get_parameter(name), _effective(graph, name), rtol=0, atol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(inplace(x), graph(x), rtol=0, atol=0)
    for name, p in graph.named_parameters():
        if name not in graph.masks():  # biases: untouched by masks
            torch.testing.assert_close(inplace.get_parameter(name), p, rtol=0, atol=0)


def test_squash_of_inplace_model_is_trivial_and_equal() -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), {"mode": "inplace", "weights": [{"target": "type:Linear", **L1}]})
    sgm.step()
    opt = torch.optim.SGD(sgm.parameters(), lr=0.1, momentum=0.9)
    sgm.keep_sparse(opt)
    _train(sgm, opt, _data(3))
    squashed = sgm.squash()
    assert squashed.code == sgm.code  # nothing to fold: the graph never had a mask node
    assert not any(n.endswith("_mask") for n, _ in squashed.named_buffers())
    for name in sgm.masks():
        torch.testing.assert_close(squashed.get_parameter(name), sgm.get_parameter(name), rtol=0, atol=0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(squashed(x), sgm(x), rtol=0, atol=0)


# --- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        {"init_sparsity": 0.0, "init_step": 0, "delta_step": 1, "total_steps": 10, "initially_zero": False},
        {"init_sparsity": 0.1, "init_step": 2, "delta_step": 3, "total_steps": 4, "initially_zero": False},
        {"init_sparsity": 0.2, "init_step": 3, "delta_step": 2, "total_steps": 5, "initially_zero": True},
    ],
)
def test_cubic_schedule_equals_cubic_sl(settings: dict[str, Any]) -> None:
    final = 0.8
    ref_model = MLP()
    sparsifier = WeightNormSparsifier(sparsity_level=final)
    sparsifier.prepare(ref_model, [{"tensor_fqn": "fc1.weight"}])
    scheduler = CubicSL(
        sparsifier,
        init_sl=settings["init_sparsity"],
        init_t=settings["init_step"],
        delta_t=settings["delta_step"],
        total_t=settings["total_steps"],
        initially_zero=settings["initially_zero"],
    )
    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {
                    "target": "fc1",
                    "method": "l1_unstructured",
                    "sparsity": final,
                    "schedule": {"kind": "cubic", **settings},
                }
            ]
        },
    )
    for _ in range(25):
        assert sgm.target_sparsity()["fc1.weight"] == sparsifier.groups[0]["sparsity_level"]
        sgm.step()
        sparsifier.step()
        scheduler.step()
    assert sgm.target_sparsity()["fc1.weight"] == final


def test_cubic_schedule_defaults_equal_cubic_sl() -> None:
    sparsifier = WeightNormSparsifier(sparsity_level=0.6)
    sparsifier.prepare(MLP(), [{"tensor_fqn": "fc1.weight"}])
    scheduler = CubicSL(sparsifier)
    sgm = fxs.sparsify_graph(
        MLP(),
        {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.6, "schedule": {"kind": "cubic"}}]},
    )
    for _ in range(40):
        assert sgm.target_sparsity()["fc1.weight"] == sparsifier.groups[0]["sparsity_level"]
        sgm.step()
        sparsifier.step()
        scheduler.step()


def test_linear_schedule() -> None:
    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {
                    "target": "fc1",
                    "method": "l1_unstructured",
                    "sparsity": 0.9,
                    "schedule": {"kind": "linear", "start": 0.2, "end": 0.6, "steps": 4},
                }
            ]
        },
    )
    seen = []
    for _ in range(7):
        seen.append(sgm.target_sparsity()["fc1.weight"])
        sgm.step()
    assert seen == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6])
    assert sgm.sparsity()["fc1.weight"] == pytest.approx(0.6, abs=1 / 512)


def test_callable_schedule_drives_the_mask() -> None:
    levels = [0.0, 0.25, 0.5, 0.5, 0.75]
    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {
                    "target": "fc2",
                    "method": "l1_unstructured",
                    "sparsity": 0.75,
                    "schedule": lambda t: levels[min(t, len(levels) - 1)],
                }
            ]
        },
    )
    for level in levels:
        assert sgm.target_sparsity()["fc2.weight"] == level
        sgm.step()
        assert sgm.sparsity()["fc2.weight"] == pytest.approx(level)


def test_schedule_drives_the_mask_during_training() -> None:
    torch.manual_seed(0)
    spec = {
        "weights": [
            {
                "target": "type:Linear",
                "method": "l1_unstructured",
                "sparsity": 0.8,
                "schedule": {"kind": "cubic", "delta_step": 1, "total_steps": 5},
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    opt = torch.optim.SGD(sgm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = _data(12)
    previous = {n: torch.ones_like(m) for n, m in sgm.masks().items()}
    achieved = []
    for i in range(0, 12, 2):
        aim = sgm.target_sparsity()  # the target of the step() about to run
        sgm.step()
        for name, keep in sgm.masks().items():
            assert not (keep & ~previous[name]).any(), "a pruned weight came back"
            assert sgm.sparsity()[name] == pytest.approx(aim[name], abs=1 / 256)
        previous = {n: m.clone() for n, m in sgm.masks().items()}
        achieved.append(sgm.sparsity()["fc1.weight"])
        _train(sgm, opt, data[i : i + 2])
    assert achieved == sorted(achieved) and achieved[0] == 0.0
    assert achieved[-1] == pytest.approx(0.8, abs=1e-3)


# --- supermask -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["supermask", "joint"])
def test_supermask_scores_change_the_mask_during_training(gradient: str) -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc2", **L1, "gradient": gradient}]})
    sgm.step()
    before = sgm.masks()["fc2.weight"].clone()
    weight = sgm.get_parameter("fc2.weight").detach().clone()
    (scores,) = [p for n, p in sgm.named_parameters() if n.endswith(".scores")]
    torch.testing.assert_close(scores.detach(), weight.abs())  # scores start at |weight|
    opt = torch.optim.SGD(sgm.parameters(), lr=0.05)
    for x, y in _data(10):
        opt.zero_grad()
        (sgm(x) - y).pow(2).sum().backward()
        opt.step()
    sgm.step()
    after = sgm.masks()["fc2.weight"]
    assert not torch.equal(after, before)
    assert sgm.sparsity()["fc2.weight"] == pytest.approx(0.5)
    # the mask is the method applied to the scores
    assert torch.equal(after, fxs.compute_mask("l1_unstructured", scores.detach(), sparsity=0.5))
    moved = not torch.equal(sgm.get_parameter("fc2.weight").detach(), weight)
    assert moved == (gradient == "joint")
