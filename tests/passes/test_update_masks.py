"""step(): global rules, importance scores, regrow, seeded randomness (SPEC §3, §4)."""

from __future__ import annotations

import copy

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
    prune.global_unstructured([(ref.fc1, "weight"), (ref.fc2, "weight")], pruning_method=prune.L1Unstructured, amount=0.6)
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

    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", "method": "keep_positive_test", "margin": 0.0, "regrow": True}]})
    sgm.step()
    assert torch.equal(sgm.masks()["fc1.weight"], sgm.fc1.weight > 0)
    assert "keep_positive_test" in fxs.available_mask_methods()


def test_raising_the_sparsity_prunes_among_the_survivors() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1, "sparsity": 0.5,
                                                  "schedule": {"kind": "linear", "start": 0.25, "end": 0.75, "steps": 2}}]})
    seen = []
    for _ in range(3):
        sgm.step()
        seen.append(sgm.masks()["fc1.weight"].clone())
    assert [round(1 - float(m.float().mean()), 4) for m in seen] == [0.25, 0.5, 0.75]
    for before, after in zip(seen, seen[1:]):
        assert not torch.any(after & ~before)  # nothing pruned comes back
