"""step() keeps its temporaries small (SPEC §15): no copy of weights that are already masked."""

from __future__ import annotations

import copy

import torch

import fx_sparsify as fxs
from fx_sparsify.passes.update_masks import weight_scores

from models import MLP

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


def test_scores_of_already_masked_weights_are_the_weights_themselves() -> None:
    sgm = fxs.sparsify_graph(MLP(), {**SPEC, "mode": "inplace"})
    sgm.step()
    for r in sgm._fxs.targets.values():
        weight = sgm.get_parameter(r.param)
        assert weight_scores(sgm, r).data_ptr() == weight.data_ptr()  # ranked as it is, no copy


def test_scores_of_unmasked_weights_are_a_masked_copy() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    for r in sgm._fxs.targets.values():
        weight = sgm.get_parameter(r.param)
        scores = weight_scores(sgm, r)
        assert scores.data_ptr() != weight.data_ptr()
        assert torch.equal(scores, torch.where(sgm.get_buffer(r.buffer), weight, torch.zeros(())))


def test_inplace_mode_steps_equal_graph_mode_steps() -> None:
    model = MLP()
    graph = fxs.sparsify_graph(model, {**SPEC, "weights": [{**SPEC["weights"][0], "sparsity": 0.3}]})
    inplace = fxs.sparsify_graph(
        model, {**SPEC, "mode": "inplace", "weights": [{**SPEC["weights"][0], "sparsity": 0.3}]}
    )
    for sparsity in (0.3, 0.6):
        for sgm in (graph, inplace):
            sgm._fxs.targets["fc1.weight"].rule.options["sparsity"] = sparsity
            sgm.step()
        assert all(torch.equal(graph.masks()[k], m) for k, m in inplace.masks().items())


def test_global_l1_over_large_targets_equals_global_unstructured() -> None:
    """A global L1 rule is ranked across its targets without concatenating them: same masks as torch's."""
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 200))
    spec = {"global": [{"targets": ["0", "2"], "method": "l1_unstructured", "sparsity": 0.6}]}
    sgm = fxs.sparsify_graph(model, spec)
    for _ in range(2):  # the second step ranks the already-pruned zeros too
        sgm.step()
    ref = copy.deepcopy(model)
    prune.global_unstructured([(ref[0], "weight"), (ref[2], "weight")], prune.L1Unstructured, amount=0.6)
    assert model[0].weight.numel() + model[2].weight.numel() > 65536  # past the small-tensor path
    assert torch.equal(sgm.masks()["0.weight"], ref[0].weight_mask.bool())
    assert torch.equal(sgm.masks()["2.weight"], ref[2].weight_mask.bool())
