"""The tiny pass contract: a pass takes ``(gm, state)``, edits the GraphModule in place (or builds a new one)
and says what it did in a :class:`PassResult`; :func:`run_passes` runs a list of them in order.

A pass that needs more than the module and the state gets it bound beforehand
(``functools.partial(remove_channels, keeps=keeps)``); the runner names a pass by its function's name.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch.fx import GraphModule, Node

__all__ = ["PassResult", "Pass", "finish", "run_passes", "pass_name", "eliminate_dead_code", "writes_in_place"]

#: Python-level functions that write into their first argument (fx records ``x += y`` / ``x[i] = y``)
_WRITES_INTO = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.imatmul,
        operator.setitem,
    }
)


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and per target name the attributes it created."""

    gm: GraphModule
    modified: bool
    created: dict[str, dict[str, str]] = field(default_factory=dict)


#: a pass: ``(gm, state) -> PassResult``; ``state`` is whatever the stage works from (a SparsityState, a Selection)
Pass = Callable[[GraphModule, Any], PassResult]


def pass_name(fn: Callable[..., Any]) -> str:
    """The name errors give a pass: its function's ``__name__`` (through ``functools.partial``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return str(getattr(fn, "__name__", type(fn).__name__))


def run_passes(gm: GraphModule, state: Any, passes: Sequence[Pass]) -> list[PassResult]:
    """Run ``passes`` in order, each on the module the one before returned; their results, in order.

    An exception from a pass is raised again as the same type with the pass's name in front of its
    message, chained to the original (``raise ... from err``); one whose type cannot be built from a
    message goes on unchanged, with the pass's name added as a note.
    """
    results: list[PassResult] = []
    for fn in passes:
        try:
            result = fn(gm, state)
        except Exception as err:
            named = _named(err, pass_name(fn))
            if named is None:
                raise
            raise named from err
        results.append(result)
        gm = result.gm
    return results


def _named(err: Exception, name: str) -> Exception | None:
    """``err`` as a new exception of its type whose message starts with ``name``; None where that cannot be."""
    message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    if message.startswith(f"{name}: "):  # named already (a pass that runs passes)
        return None
    try:
        new = type(err)(f"{name}: {message}")
    except Exception:
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"(in pass {name})")
        return None
    new.__dict__.update(err.__dict__)  # attributes an exception type keeps besides its message
    return new


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
        if (
            not node.users
            and node.op not in ("placeholder", "output")
            and not (node.is_impure() or writes_in_place(node))
        ):
            gm.graph.erase_node(node)
            changed = True
    return changed  # (Graph.eliminate_dead_code's is_impure_node argument is newer than torch 2.4)
