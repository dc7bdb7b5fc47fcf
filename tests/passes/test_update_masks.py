"""step(): global rules, importance scores, regrow, seeded randomness (SPEC §3, §4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune

import fx_sparsify as fxs

from models import MLP

L1 = {"method": "l1_unstructured"}


def test_global_rule_equals_prune_global_unstructured() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(model, {"global": [{"targets": ["fc1", "fc2"], **L1, "sparsity": 0.6}]})
    sgm.step()
    ref = copy.deepcopy(model)
    prune.global_unstructured(
        [(ref.fc1, "weight"), (ref.fc2, "weight")], pruning_method=prune.L1Unstructured, amount=0.6
    )
    assert torch.equal(sgm.masks()["fc1.weight"], ref.fc1.weight_mask.bool())
    assert torch.equal(sgm.masks()["fc2.weight"], ref.fc2.weight_mask.bool())
    total = sgm.masks()["fc1.weight"].numel() + sgm.masks()["fc2.weight"].numel()
    zeros = sum(int((~m).sum()) for m in sgm.masks().values())
    assert zeros == round(0.6 * total)
    assert sgm.sparsity()["fc1.weight"] != sgm.sparsity()["fc2.weight"]  # ranked together, not per tensor


def test_importance_scores_callable_and_tensor_name_equal_prune() -> None:
    model = MLP()
    scores = torch.rand_like(model.fc1.weight)
    model.register_buffer("fc1_importance", scores.clone())
    ref = prune.L1Unstructured(0.5).compute_mask(scores, torch.ones_like(scores)).bool()
    for source in ("fc1_importance", lambda w: scores):
        sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1, "sparsity": 0.5, "scores": source}]})
        sgm.step()
        assert torch.equal(sgm.masks()["fc1.weight"], ref)


def test_pruned_stays_pruned_unless_regrow() -> None:
    model = MLP()
    for regrow in (False, True):
        sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1, "sparsity": 0.5, "regrow": regrow}]})
        sgm.step()
        first = sgm.masks()["fc1.weight"].clone()
        with torch.no_grad():  # the pruned weights grow large, the kept ones shrink
            w = sgm.fc1.weight
            w.copy_(torch.where(first, w * 1e-3, w.sign() * 10 + w))
        sgm.step()
        again = sgm.masks()["fc1.weight"]
        if regrow:
            assert torch.equal(again, ~first)  # ranks raw values: the big ones come back
        else:
            assert torch.equal(again, first)  # ranks masked values: pruned stays pruned


def test_random_masks_depend_on_seed_and_name_not_visiting_order() -> None:
    model = MLP()
    rule = {"method": "random_unstructured", "sparsity": 0.5}
    a = fxs.sparsify_graph(model, {"seed": 1, "weights": [{"target": "fc1", **rule}, {"target": "fc2", **rule}]})
    b = fxs.sparsify_graph(model, {"seed": 1, "weights": [{"target": "fc2", **rule}]})
    c = fxs.sparsify_graph(model, {"seed": 2, "weights": [{"target": "fc2", **rule}]})
    for s in (a, b, c):
        s.step()
    assert torch.equal(a.masks()["fc2.weight"], b.masks()["fc2.weight"])
    assert not torch.equal(b.masks()["fc2.weight"], c.masks()["fc2.weight"])
    assert abs(a.sparsity()["fc1.weight"] - 0.5) < 1e-9


def test_user_registered_method_used_from_a_spec() -> None:
    @fxs.register_mask_method("keep_positive_test", override=True)
    def keep_positive(tensor: torch.Tensor, *, margin: float = 0.0) -> torch.Tensor:
        """Keep entries above a margin."""
        return tensor > margin

    sgm = fxs.sparsify_graph(
        MLP(), {"weights": [{"target": "fc1", "method": "keep_positive_test", "margin": 0.0, "regrow": True}]}
    )
    sgm.step()
    assert torch.equal(sgm.masks()["fc1.weight"], sgm.fc1.weight > 0)
    assert "keep_positive_test" in fxs.available_mask_methods()


def test_raising_the_sparsity_prunes_among_the_survivors() -> None:
    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {
                    "target": "fc1",
                    **L1,
                    "sparsity": 0.5,
                    "schedule": {"kind": "linear", "start": 0.25, "end": 0.75, "steps": 2},
                }
            ]
        },
    )
    seen = []
    for _ in range(3):
        sgm.step()
        seen.append(sgm.masks()["fc1.weight"].clone())
    assert [round(1 - float(m.float().mean()), 4) for m in seen] == [0.25, 0.5, 0.75]
    for before, after in zip(seen, seen[1:]):
        assert not torch.any(after & ~before)  # nothing pruned comes back


def test_topk_repeated_step_keeps_its_mask_and_raising_prunes_among_survivors() -> None:
    # topk ranks raw values: pruned entries must rank below every kept one (a pruned 0 outranks a kept -1)
    for amount in ({"density": 0.5}, {"density": 0.9}, {"sparsity": 0.3}):
        sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", "method": "topk", **amount}]})
        sgm.step()
        first = sgm.masks()["fc1.weight"].clone()
        sgm.step()
        assert torch.equal(sgm.masks()["fc1.weight"], first), amount
    sgm = fxs.sparsify_graph(
        MLP(),
        {
            "weights": [
                {
                    "target": "fc1",
                    "method": "topk",
                    "sparsity": 0.3,
                    "schedule": {"kind": "linear", "start": 0.3, "end": 0.6, "steps": 1},
                }
            ]
        },
    )
    sgm.step()
    before = sgm.masks()["fc1.weight"].clone()
    sgm.step()
    after = sgm.masks()["fc1.weight"]
    assert not torch.any(after & ~before) and int((~after).sum()) == round(0.6 * after.numel())


def test_ste_regrows_by_default_unless_regrow_false() -> None:
    model = MLP()
    for regrow, expect_regrowth in ((None, True), (False, False)):
        rule = {"target": "fc1", **L1, "sparsity": 0.5, "gradient": "ste"}
        if regrow is not None:
            rule["regrow"] = regrow
        sgm = fxs.sparsify_graph(model, {"weights": [rule]})
        sgm.step()
        first = sgm.masks()["fc1.weight"].clone()
        with torch.no_grad():  # the straight-through gradient grew the pruned weights large
            w = sgm.fc1.weight
            w.copy_(torch.where(first, w * 1e-3, w.sign() * 10 + w))
        sgm.step()
        assert torch.equal(sgm.masks()["fc1.weight"], ~first if expect_regrowth else first)


def _state(sgm: fxs.SparseGraphModule) -> dict[str, object]:
    return copy.deepcopy(dict(sgm.state_dict()))


def _same(a: object, b: object) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_failed_step_changes_nothing() -> None:
    @fxs.register_mask_method("fails_test", override=True)
    def fails(tensor: torch.Tensor) -> torch.Tensor:
        """Always raises (a user method with a bug)."""
        raise RuntimeError("user method failed")

    spec = {
        "weights": [{"target": "fc1", **L1, "sparsity": 0.5}, {"target": "fc2", "method": "fails_test"}],
        "activations": [
            {"target": "head", "aggregate": "sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.5}
        ],
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    sgm(torch.randn(4, 16))
    before, steps = _state(sgm), sgm._fxs.steps
    try:
        sgm.step()
    except RuntimeError:
        pass
    else:
        raise AssertionError("step() should have raised")
    after = _state(sgm)
    assert after.keys() == before.keys() and all(_same(after[k], before[k]) for k in before)
    assert sgm._fxs.steps == steps and sgm.get_submodule("head_input_observer").batches == 1


def test_shape_dependent_option_errors_come_at_sparsify_graph_and_name_the_target() -> None:
    model = MLP()  # fc1.weight (32, 16), fc1.bias (32,)
    cases = [
        ({"target": "fc1", "method": "nm", "n": 2, "m": 3}, ValueError, "fc1.weight.*not divisible by m=3"),
        ({"target": "fc1", "method": "l1_unstructured", "sparsity": 10_000}, ValueError, "fc1.weight.*count"),
        ({"target": "fc1.bias", "method": "ln_structured", "sparsity": 0.5}, ValueError, "fc1.bias.*at least 2 dims"),
        ({"target": "fc1", "method": "ln_structured", "sparsity": 0.5, "dim": 5}, ValueError, "dim=5 is out of range"),
        (
            {"target": "fc1", "method": "block", "sparsity": 0.5, "block_shape": (2, 1, 4)},
            ValueError,
            "fc1.weight.*block",
        ),
    ]
    for rule, error, match in cases:
        with pytest.raises(error, match=match):
            fxs.sparsify_graph(model, {"weights": [rule]})
    with pytest.raises(ValueError, match="global rule over fc1.weight, fc2.weight.*at least 2 dims"):
        fxs.sparsify_graph(model, {"global": [{"targets": ["fc1", "fc2"], "method": "ln_structured", "sparsity": 0.5}]})


def test_option_errors_without_a_shape_come_when_the_spec_is_built() -> None:
    for rule in (
        {"method": "topk", "density": 0.5, "sparsity": 0.5},
        {"method": "nm", "n": 5, "m": 4},
        {"method": "nm", "n": 2, "m": "4"},
        {"method": "threshold", "threshold": -1.0},
    ):
        with pytest.raises((ValueError, TypeError)):
            fxs.SparsitySpec.from_dict({"weights": [{"target": "fc1", **rule}]})
