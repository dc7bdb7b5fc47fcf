"""The tiny pass contract: each pass edits a GraphModule in place and says what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule

__all__ = ["PassResult", "finish"]


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph and the names it added or removed."""

    gm: GraphModule
    modified: bool
    names: list[str] = field(default_factory=list)


def finish(gm: GraphModule, names: list[str]) -> PassResult:
    """Close a pass the one way: lint, recompile, report."""
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(names), names)
