"""The channel analysis' view of a captured graph: its ops, who reads each tensor, every value's shape.

:class:`ChannelGraph` sees each node as an op of :mod:`.ops` and indexes the readers of every parameter
once; :func:`record_shapes` reads every value's shape (from an export capture's ``meta['val']``, else one
run on example inputs); :func:`weight_dim` says which dim of a tensor holds a layer's output (or input)
channels when every use of it is a layer's weight.

The plan's plain data that the flood produces lives here too: a :class:`Member` (a tensor slice of a
group) and an :class:`Edit` (an int argument or attribute that shrinks with a group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node

from .ops import FUNCTIONS, LAYERS, METHODS, MODULES, POOLS, Op, Value, tensor_args

__all__ = ["Member", "Edit", "Unmappable", "ChannelGraph", "record_shapes", "uses", "weight_dim", "is_layer_weight"]


# --- the plan's plain data (strings and ints), so it pickles and deep-copies with the module -------
@dataclass(frozen=True)
class Member:
    """A tensor slice of a group: along ``dim``, unit ``c`` covers ``[offset + c*width, offset + (c+1)*width)``."""

    tensor: str
    dim: int
    offset: int = 0
    width: int = 1
    is_param: bool = True
    consumer: bool = False  # a layer's input columns (a pruned unit there multiplies nothing)

    def indices(self, units: Iterable[int]) -> list[int]:
        return [self.offset + c * self.width + i for c in units for i in range(self.width)]


@dataclass(frozen=True)
class Edit:
    """An int that equals a slot's size and shrinks with it: ``("attr", module, name)`` or ``("arg", node, path)``."""

    kind: str
    where: str
    path: tuple[Any, ...]
    width: int


class Unmappable(Exception):
    """A slot reached something the table cannot map. ``split``: the reshape's inner size, where one cut it."""

    def __init__(self, node: Node | None, reason: str, split: int | None = None) -> None:
        super().__init__(reason)
        self.node, self.reason, self.split = node, reason, split


class ChannelGraph:
    """The graph with its ops, shapes and who reads each tensor, computed once."""

    def __init__(self, gm: GraphModule, aliases: Mapping[str, str], shapes: dict[Node, Any]) -> None:
        self.gm, self.aliases, self.shapes = gm, aliases, shapes
        self.ops: dict[Node, Op | None] = {}
        self.reads: dict[str, list[tuple[Node, int]]] = {}
        for node in gm.graph.nodes:
            op = self._op(node)
            self.ops[node] = op
            if op is not None:
                for i, v in enumerate(op.operands):
                    if isinstance(v, str):
                        self.reads.setdefault(v, []).append((node, i))

    def canonical(self, path: str) -> str:
        return self.aliases.get(path, path)

    def _op(self, node: Node) -> Op | None:
        if node.op == "get_attr":
            return Op("attr", node, [self.canonical(str(node.target))])
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            entry = MODULES.get(type(module))
            if entry is None:
                return Op("unknown", node, tensor_args(node), {"what": f"module {type(module).__name__}"})
            kind, names = entry
            prefix = f"{node.target}." if node.target else ""
            params: list[Value | None] = []
            for n in names:
                t = getattr(module, n, None)
                params.append(self.canonical(prefix + n) if isinstance(t, Tensor) else None)
            extra = self._module_extra(module, node)
            if kind == "pointwise":
                return Op(kind, node, tensor_args(node), extra)
            first: Any = node.args[0] if node.args else node.kwargs.get("input")
            return Op(kind, node, [first, *params], extra)
        if node.op in ("call_function", "call_method"):
            if node.op == "call_method":
                rule = METHODS.get(str(node.target))
                what = f"method .{node.target}()"
            else:
                target = node.target
                rule = FUNCTIONS.get(target) or FUNCTIONS.get(getattr(target, "overloadpacket", None))
                what = f"function {getattr(target, '__name__', target)}"
            if rule is None:
                return Op("unknown", node, tensor_args(node), {"what": what})
            kind, norm = rule
            operands, extra = norm(node)
            return Op(kind, node, operands, extra)
        return None

    def _module_extra(self, module: nn.Module, node: Node) -> dict[str, Any]:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return {"groups": module.groups, "groups_at": ("attr", "groups")}
        if isinstance(module, nn.LayerNorm):
            return {"normalized": len(module.normalized_shape)}
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return {"dim": module.dim}
        if type(module) in POOLS:
            return {"spatial": POOLS[type(module)]}
        return {}

    @staticmethod
    def tensor_shape(gm: nn.Module, name: str) -> tuple[int, ...] | None:
        for getter in (gm.get_parameter, gm.get_buffer):
            try:
                return tuple(getter(name).shape)
            except AttributeError:
                continue
        return None

    def shape(self, v: Value | None) -> tuple[int, ...] | None:
        if v is None:
            return None
        if isinstance(v, str):
            return self.tensor_shape(self.gm, v)
        s = self.shapes.get(v)
        if s is None and v.op == "get_attr":
            return self.shape(self.canonical(str(v.target)))
        return tuple(s) if isinstance(s, torch.Size) else None


# --- shapes ------------------------------------------------------------------------------------------
class _ShapeRecorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
        return result


def record_shapes(
    gm: GraphModule, example_inputs: tuple[Any, ...] | None, example_kwargs: dict[str, Any] | None
) -> dict[Node, Any]:
    """Every tensor node's shape: from an export capture's ``meta['val']``, else one run on the example inputs."""
    shapes: dict[Node, Any] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, Tensor):
            shapes[node] = val.shape
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.op.startswith("call_") and "val" in n.meta for n in gm.graph.nodes):  # export capture: shapes known
        return shapes
    if example_inputs is None and example_kwargs is None:
        raise ValueError(
            "a 'channels' rule needs the shapes of the graph's values to map channels through reshapes: pass "
            "example_inputs=(x,) (and example_kwargs) to sparsify_graph"
        )
    args = list(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    inputs = []
    for p in placeholders:
        if args:
            inputs.append(args.pop(0))
        elif str(p.target) in kwargs:
            inputs.append(kwargs[str(p.target)])
        else:
            inputs.append(p.args[0] if p.args else None)
    recorder = _ShapeRecorder(gm)
    training = gm.training
    gm.eval()  # no running statistics move, no dropout
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as exc:
        raise ValueError(
            f"the rewritten module failed on example_inputs: {type(exc).__name__}: {exc}. Check that the example "
            "inputs match the model's forward (the channel analysis runs it once to read every value's shape)"
        ) from exc
    finally:
        gm.train(training)
    return recorder.shapes


def uses(graph: ChannelGraph, tensor: str) -> list[tuple[Op, int]]:
    """The ops reading ``tensor`` and its operand position there, seen through ``get_attr`` nodes."""
    out = []
    for n, pos in graph.reads.get(tensor, []):
        op = graph.ops.get(n)
        if op is None:
            continue
        if op.kind != "attr":
            out.append((op, pos))
            continue
        for user in n.users:
            uop = graph.ops.get(user)
            if uop is not None:
                out += [(uop, i) for i, v in enumerate(uop.operands) if v is n]
    return out


def weight_dim(
    graph: ChannelGraph, tensor: str, kinds: tuple[str, ...] = ("linear", "conv", "addmm"), columns: bool = False
) -> int | None:
    """The dim of ``tensor`` holding output (``columns``: input) channels when every use is a layer's weight."""
    dims = {
        (LAYERS[op.kind].in_dim if columns else LAYERS[op.kind].out_dim)
        if op.kind in kinds and pos == LAYERS[op.kind].weight
        else None
        for op, pos in uses(graph, tensor)
    }
    return dims.pop() if len(dims) == 1 else None


def is_layer_weight(graph: ChannelGraph, tensor: str, kinds: tuple[str, ...] = ("linear", "conv", "addmm")) -> bool:
    return weight_dim(graph, tensor, kinds) is not None
