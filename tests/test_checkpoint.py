"""Checkpoints (SPEC §8): deepcopy, pickle, torch.save of the whole module, and bit-identical resume."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import fx_sparsify as fxs

from models import MLP

# _run's first step() comes before any batch: the activation mask warns that it saw no data
pytestmark = pytest.mark.filterwarnings(r"ignore:step\(\). activation target")

# every kind of training state: a scheduled weight mask, learnable supermask scores, a random
# method (seeded), and an activation observer whose statistics are mid-way between two steps
SPEC: dict[str, Any] = {
    "seed": 3,
    "weights": [
        {
            "target": "fc1",
            "method": "l1_unstructured",
            "sparsity": 0.75,
            "schedule": {"kind": "cubic", "init_sparsity": 0.1, "delta_step": 1, "total_steps": 6},
        },
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5, "gradient": "joint"},
        {"target": "head", "method": "random_unstructured", "sparsity": 0.25},
    ],
    "activations": [
        {"target": "head", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.25}
    ],
}
INPLACE_SPEC: dict[str, Any] = {
    "mode": "inplace",
    "weights": [
        {
            "target": "type:Linear",
            "method": "l1_unstructured",
            "sparsity": 0.8,
            "schedule": {"kind": "linear", "start": 0.2, "end": 0.8, "steps": 4},
        }
    ],
}


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(n)]


def _run(
    sgm: fxs.SparseGraphModule, opt: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]], start: int
) -> None:
    """Train on ``data``; a step() every third iteration, counted from ``start`` (the global iteration)."""
    for i, (x, y) in enumerate(data, start):
        if i % 3 == 0:
            sgm.step()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(sgm(x), y).backward()
        opt.step()


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


def _optimizer(sgm: fxs.SparseGraphModule) -> torch.optim.Optimizer:
    return torch.optim.Adam(sgm.parameters(), lr=0.01)


@pytest.mark.parametrize("spec", [SPEC, INPLACE_SPEC], ids=["graph", "inplace"])
def test_resume_from_state_dict_is_bit_identical(spec: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = MLP()
    first, later = _batches(7, seed=1), _batches(8, seed=2)

    sgm = fxs.sparsify_graph(model, spec)
    opt = _optimizer(sgm)
    if spec.get("mode") == "inplace":
        sgm.keep_sparse(opt)
    _run(sgm, opt, first, start=0)  # 3 step() calls; observer statistics of one batch pending
    saved = io.BytesIO()
    torch.save({"model": sgm.state_dict(), "optim": opt.state_dict()}, saved)
    _run(sgm, opt, later, start=len(first))

    saved.seek(0)
    ckpt = torch.load(saved)  # weights_only: a state_dict holds tensors and plain values only
    fresh = fxs.sparsify_graph(model, spec)
    fresh.load_state_dict(ckpt["model"])
    assert fresh._fxs.steps == 3
    fresh_opt = _optimizer(fresh)
    fresh_opt.load_state_dict(ckpt["optim"])
    if spec.get("mode") == "inplace":
        fresh.keep_sparse(fresh_opt)
    _run(fresh, fresh_opt, later, start=len(first))

    _assert_identical(fresh, sgm)
    assert fresh.target_sparsity() == sgm.target_sparsity()
    for name, mask in sgm.masks().items():
        assert torch.equal(fresh.masks()[name], mask)
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), sgm(x))


def test_state_dict_holds_masks_scores_observer_statistics_and_step_count() -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    _run(sgm, _optimizer(sgm), _batches(5, seed=1), start=0)
    state = sgm.state_dict()
    assert any(k.endswith(".scores") for k in state)  # supermask / joint scores
    assert "fc1_weight_mask" in state and "head_weight_mask" in state
    stats = [k for k in state if k.endswith(".stat")]
    assert stats and all(state[k].numel() > 0 for k in stats)  # pending statistics of 2 batches
    extra = [v for k, v in state.items() if k.endswith("_extra_state")]
    assert {"steps": 2} in extra and {"samples": 16, "batches": 2} in extra


def _trained(spec: dict[str, Any]) -> tuple[fxs.SparseGraphModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), spec)
    opt = torch.optim.SGD(sgm.parameters(), lr=0.05, momentum=0.9)
    if spec.get("mode") == "inplace":
        sgm.keep_sparse(opt)
    _run(sgm, opt, _batches(5, seed=1), start=0)
    return sgm, opt


def _torch_save_load(sgm: fxs.SparseGraphModule) -> Any:
    buf = io.BytesIO()
    torch.save(sgm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES: dict[str, Callable[[fxs.SparseGraphModule], Any]] = {
    "deepcopy": copy.deepcopy,
    "copy": copy.copy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_load,
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("spec", [SPEC, INPLACE_SPEC], ids=["graph", "inplace"])
def test_whole_module_copies_continue_identically(how: str, spec: dict[str, Any]) -> None:
    sgm, _ = _trained(spec)
    clone = COPIES[how](sgm)
    assert isinstance(clone, fxs.SparseGraphModule) and clone is not sgm
    assert clone.code == sgm.code and clone.training == sgm.training
    _assert_identical(clone, sgm)
    assert clone.target_sparsity() == sgm.target_sparsity()
    assert clone.report() == sgm.report()
    # independent: nothing is shared with the original
    storage = {t.data_ptr() for t in sgm.state_dict().values() if isinstance(t, torch.Tensor) and t.numel()}
    assert not storage & {
        t.data_ptr() for t in clone.state_dict().values() if isinstance(t, torch.Tensor) and t.numel()
    }
    # both continue the run the same way (fresh optimizers: the copy has new parameter objects)
    later = _batches(6, seed=2)
    for m in (sgm, clone):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        if spec.get("mode") == "inplace":
            m.keep_sparse(opt)
        _run(m, opt, later, start=5)
    _assert_identical(clone, sgm)
    x = torch.randn(3, 16)
    assert torch.equal(clone(x), sgm(x))
    torch.testing.assert_close(clone.squash()(x), sgm.squash()(x), rtol=0, atol=0)


def test_copied_module_masks_are_independent() -> None:
    sgm, _ = _trained(SPEC)
    clone = copy.deepcopy(sgm)
    clone.step()
    clone.step()
    assert clone._fxs.steps == sgm._fxs.steps + 2
    assert clone.target_sparsity()["fc1.weight"] > sgm.target_sparsity()["fc1.weight"]
    assert clone.sparsity()["fc1.weight"] > sgm.sparsity()["fc1.weight"]


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copies_keep_the_straight_through_gradient(how: str) -> None:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(
        MLP(), {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5, "gradient": "ste"}]}
    )
    sgm.step()
    clone = COPIES[how](sgm)
    assert clone.code == sgm.code
    x = torch.randn(4, 16)
    sgm(x).sum().backward()
    clone(x).sum().backward()
    keep = sgm.masks()["fc1.weight"]
    assert (clone.get_parameter("fc1.weight").grad[~keep] != 0).any()
    torch.testing.assert_close(clone.get_parameter("fc1.weight").grad, sgm.get_parameter("fc1.weight").grad)
    squashed = clone.squash()
    assert not any(n.endswith("_mask") for n, _ in squashed.named_buffers())
    assert squashed.code == sgm.squash().code


def test_pickled_copy_keeps_node_names_targets_and_annotations() -> None:
    sgm, _ = _trained(SPEC)
    clone = pickle.loads(pickle.dumps(sgm))
    ours = [(n.op, n.name, n.target, n.meta.get("fx_sparsify")) for n in sgm.graph.nodes]
    assert [(n.op, n.name, n.target, n.meta.get("fx_sparsify")) for n in clone.graph.nodes] == ours
    assert clone.report() == sgm.report()


def test_export_capture_pickle_error_names_the_way_out() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    sgm = fxs.sparsify_graph(
        model,
        {"weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5}]},
        capture="export",
        example_inputs=(x,),
    )
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(sgm)
    clone = copy.deepcopy(sgm)  # deepcopy works for both captures
    clone.step()
    assert clone.sparsity()["0.weight"] == 0.5 and sgm.sparsity()["0.weight"] == 0.0
    assert torch.equal(clone(x), clone.squash()(x))
