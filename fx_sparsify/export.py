"""Stage: export the squashed module with ``torch.export`` and check that no mask op survived."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from . import ops

__all__ = ["export", "leftover_ops"]


def leftover_ops(gm: GraphModule) -> list[str]:
    """Names of nodes that still call an fx_sparsify op (empty for a properly squashed module)."""
    return [
        n.format_node()
        for n in gm.graph.nodes
        if n.op == "call_function"
        and (n.target in ops.OPS or getattr(n.target, "__module__", "").startswith("fx_sparsify"))
    ]


def export(
    gm: torch.nn.Module,
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: dict[str, Any] | None = None,
    **export_kwargs: Any,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` a squashed module; a module that still has mask ops is refused.

    Pass the result of ``sgm.squash()``. Passing a ``SparseGraphModule`` squashes it first.
    """
    from .sparse_graph_module import SparseGraphModule

    if isinstance(gm, SparseGraphModule):
        gm = gm.squash()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(gm, GraphModule):
        left = leftover_ops(gm)
        if left:
            raise ValueError(f"the module still contains fx_sparsify ops ({'; '.join(left)}); call .squash() first")
    ep = torch.export.export(gm, tuple(example_inputs), dict(example_kwargs or {}), **export_kwargs)
    bad = [n.format_node() for n in ep.graph.nodes if "fx_sparsify" in str(n.target)]
    if bad:  # our invariant: squash removes every op of ours
        raise AssertionError(f"fx_sparsify ops survived export: {bad}")
    return ep
