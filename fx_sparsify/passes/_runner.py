"""The tiny pass contract: each pass edits a GraphModule in place and says what it did."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

__all__ = ["PassResult", "finish", "eliminate_dead_code", "writes_in_place"]

#: Python-level functions that write into their first argument (fx records ``x += y`` / ``x[i] = y``)
_WRITES_INTO = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
})


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


def writes_in_place(node: Node) -> bool:
    """Whether ``node`` writes into a tensor other nodes may read: an op with a mutable schema (export's
    ``aten.relu_``), and in an fx capture a module with ``inplace=True``, ``x.relu_()``,
    ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``x += y``, ``x[i] = y``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        assert owner is not None, node.format_node()  # our graphs always belong to a GraphModule
        return getattr(owner.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return bool(schema.is_mutable)
        if node.target in _WRITES_INTO:
            return True
        name = getattr(node.target, "__name__", "")
        return isinstance(name, str) and name.endswith("_") and not name.startswith("_")
    return False


def eliminate_dead_code(gm: GraphModule) -> bool:
    """``gm.graph.eliminate_dead_code()`` that also keeps in-place ops whose result is unused (torch's purity
    test misses them in an fx capture): ``self.act(h)`` with ``nn.ReLU(inplace=True)`` changes ``h`` for its
    later readers, and dropping it would change the output."""
    changed = False
    for node in reversed(list(gm.graph.nodes)):  # users before their inputs: a dead chain goes in one sweep
        if not node.users and node.op not in ("placeholder", "output") and not (node.is_impure() or writes_in_place(node)):
            gm.graph.erase_node(node)
            changed = True
    return changed  # (Graph.eliminate_dead_code's is_impure_node argument is newer than torch 2.4)
