"""Where each layer runs in a captured graph, and which node is its input.

A layer is found as a ``call_module`` node (fx capture) or as the ops that consume its weight (export
capture, or a layer traced through), looking through its mask node and re-views of the weight
(:data:`WEIGHT_VIEWS`). For such an op the layer's input is the operand that multiplies the weight, read
from the table :data:`INPUT_OPERAND` (``addmm(bias, x, weight)`` of a GPT-2 ``Conv1D``: ``x``); an op not
in the table (a function traced as one call, ``torch.fx.wrap``) hides the input, and :func:`layer_input`
refuses rather than pick another tensor.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .._meta import info_of

__all__ = ["LayerIndex", "ancestors", "layer_input", "INPUT_OPERAND", "WEIGHT_VIEWS"]

_aten = torch.ops.aten
_FIRST = {1: 0}  # f(input, weight, ...)
_EITHER = {1: 0, 0: 1}  # a @ b: the weight on either side, the other operand is the input
_ADDMM = {2: 1, 1: 2}  # addmm(bias, a, b)

#: op (function, aten overload or method name) → {position of the weight: position of the input it multiplies}
INPUT_OPERAND: dict[Any, dict[int, int]] = {
    **dict.fromkeys(
        (
            F.linear,
            _aten.linear.default,
            F.conv1d,
            F.conv2d,
            F.conv3d,
            F.conv_transpose1d,
            F.conv_transpose2d,
            F.conv_transpose3d,
            _aten.conv1d.default,
            _aten.conv2d.default,
            _aten.conv3d.default,
            _aten.convolution.default,
            _aten.conv_transpose1d.default,
            _aten.conv_transpose2d.input,
            _aten.conv_transpose3d.input,
        ),
        _FIRST,
    ),
    **dict.fromkeys(
        (
            torch.matmul,
            operator.matmul,
            torch.mm,
            torch.bmm,
            _aten.mm.default,
            _aten.matmul.default,
            _aten.bmm.default,
            "matmul",
            "mm",
            "bmm",
            "__matmul__",
        ),
        _EITHER,
    ),
    **dict.fromkeys((torch.addmm, torch.baddbmm, _aten.addmm.default, _aten.baddbmm.default, "addmm"), _ADDMM),
}

#: ops that only re-view the weight (``weight.t()``, ``.T``, a dtype cast): the search looks through them
WEIGHT_VIEWS: frozenset[Any] = frozenset(
    {
        torch.t,
        torch.transpose,
        torch.permute,
        torch.reshape,
        _aten.t.default,
        _aten.transpose.int,
        _aten.permute.default,
        _aten.view.default,
        _aten.reshape.default,
        _aten._to_copy.default,
        _aten.contiguous.default,
        _aten.alias.default,
        _aten.detach.default,
        _aten.numpy_T.default,
        "t",
        "transpose",
        "permute",
        "view",
        "reshape",
        "to",
        "contiguous",
        "detach",
        "type_as",
        "float",
        "half",
    }
)


class LayerIndex:
    """Which nodes run each layer, built in one pass over the graph (lookups stay O(1))."""

    def __init__(self, gm: GraphModule, aliases: Mapping[str, str]) -> None:
        self.aliases = aliases
        self.calls: dict[str, list[Node]] = {}
        self.getters: dict[str, list[Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls.setdefault(n.target, []).append(n)
            elif n.op == "get_attr":
                self.getters.setdefault(aliases.get(n.target, n.target), []).append(n)

    def __call__(self, layer: str) -> list[Node]:
        """The nodes that run ``layer``: its ``call_module`` nodes, else the ops consuming its weight. A weight
        tied to another module (GPT-2's ``lm_head`` and ``wte``) is consumed by that module's op too: where the
        capture recorded which module each op runs in, only the ops of ``layer`` itself count."""
        if layer in self.calls:
            return list(self.calls[layer])
        uses = list(dict.fromkeys(use for use, _ in self.weight_uses(layer)))
        own = [use for use in uses if _runs_in(use, layer)]
        return own or uses

    def weight_uses(self, layer: str) -> list[tuple[Node, Node]]:
        """``(op, operand)`` for every op computing with ``layer``'s weight, looking through its mask
        node and re-views (``WEIGHT_VIEWS``); ``operand`` is the node through which the weight arrives."""
        weight = self.aliases.get(f"{layer}.weight" if layer else "weight")
        todo = list(self.getters.get(weight, [])) if weight is not None else []
        out, seen = [], set()
        while todo:
            carrier = todo.pop(0)
            for use in carrier.users:
                if use in seen:
                    continue
                passes = (
                    _is_weight_mask(use)
                    or (_op_key(use) in WEIGHT_VIEWS and use.args and use.args[0] is carrier)
                    or (use.target is getattr and use.args[1:] == ("T",))
                )
                if passes:
                    seen.add(use)
                    todo.append(use)
                else:
                    out.append((use, carrier))
        return out


def _runs_in(node: Node, layer: str) -> bool:
    """Whether the capture recorded ``node`` as running inside module ``layer`` (``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    path = str(list(stack.values())[-1][0])
    return path == layer or path.startswith(f"{layer}.")


def _is_weight_mask(node: Node) -> bool:
    info = info_of(node)
    return info is not None and info.role == "weight_mask"


def _op_key(node: Node) -> Any:
    if node.op == "call_function":
        return node.target
    return node.target if node.op == "call_method" else None


def layer_input(gm: GraphModule, call: Node, layer: str, carrier: Node | None = None) -> Node:
    """The node a layer call takes as its input.

    A module call: its first argument, positional or by keyword. An op using the layer's weight (which
    arrives through ``carrier``): the operand that multiplies the weight, by ``INPUT_OPERAND``.
    """
    if call.op == "call_module":
        if call.args and isinstance(call.args[0], Node):
            return call.args[0]
        if not call.args:
            first = next(iter(inspect.signature(gm.get_submodule(call.target).forward).parameters), None)  # type: ignore[arg-type]
            found = call.kwargs.get(first) if first is not None else None
            if isinstance(found, Node):
                return found
        raise ValueError(
            f"activation rule on {layer!r}: the layer's input in the graph is not a tensor argument "
            f"({call.format_node()}); "
            "call the layer with its input tensor as the first argument"
        )
    positions = INPUT_OPERAND.get(_op_key(call), {})
    where = next((i for i, a in enumerate(call.args) if a is carrier), None)
    x = call.args[positions[where]] if where in positions and positions[where] < len(call.args) else None
    if isinstance(x, Node):
        return x
    raise ValueError(
        f"activation rule on {layer!r}: the layer's input is not visible in the captured graph. Its weight is used by "
        f"`{call.format_node()}`, an op whose input operand fx_sparsify does not know (a function traced as one "
        "call, e.g. one wrapped with torch.fx.wrap, hides the layer's input inside it). Capture with "
        "capture='export' and example_inputs=(...) so the function is traced into its ops, or target a layer "
        "whose input the graph shows."
    )


def ancestors(node: Node) -> set[Node]:
    """Every node ``node`` reads, directly or through others."""
    seen: set[Node] = set()
    todo = [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen
