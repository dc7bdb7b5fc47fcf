"""The tiny pass contract: each pass edits a GraphModule in place and says what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule

__all__ = ["PassResult", "finish"]


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and per target name the attributes it created."""

    gm: GraphModule
    modified: bool
    created: dict[str, dict[str, str]] = field(default_factory=dict)


def finish(gm: GraphModule, created: dict[str, dict[str, str]]) -> PassResult:
    """Close a pass the one way: lint, recompile (when the pass changed something), report."""
    gm.graph.lint()
    if created:
        gm.recompile()
    return PassResult(gm, bool(created), created)
