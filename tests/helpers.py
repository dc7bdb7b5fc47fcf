"""Assertions shared by the tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import ops


def fxs_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops.OPS]


def count(gm: torch.fx.GraphModule, target: Any) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attrs": sorted(vars(model)),
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["attrs"] == before["attrs"]
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        torch.testing.assert_close(after["state"][k], before["state"][k], rtol=0, atol=0)


def check_pipeline(
    model: nn.Module, spec: dict[str, Any], args: tuple[Any, ...], **kwargs: Any
) -> fxs.SparseGraphModule:
    """The core guarantees on one model: all-keep identity, step, squash ≡ masked, state_dict, export."""
    model.eval()
    before = snapshot(model)
    sgm = fxs.sparsify_graph(model, spec, **kwargs)
    sgm.eval()
    with torch.no_grad():
        torch.testing.assert_close(sgm(*args), model(*args))  # all-keep masks change nothing
        sgm.step()
        masked = sgm(*args)
    assert any(v > 0 for v in sgm.sparsity().values())
    squashed = sgm.squash()
    assert type(squashed) is not fxs.SparseGraphModule and isinstance(squashed, torch.fx.GraphModule)
    assert not fxs_nodes(squashed)
    assert not any(n.endswith("_mask") for n, _ in squashed.named_buffers())
    assert not any("fx_sparsify" in n.meta for n in squashed.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(squashed(*args), masked)
    # the squashed state_dict loads into (a copy of) the user's eager model
    fresh = copy.deepcopy(model)
    assert set(squashed.state_dict()) == set(model.state_dict())
    fresh.load_state_dict(squashed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(*args), masked)
    ep = fxs.export(squashed, args)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), masked)
    assert_unchanged(model, before)
    return sgm
