"""Analysis: channel groups of the captured graph, for ``channels`` rules and ``squash(shrink=True)`` (SPEC §10).

A *group* is a set of channel slices that must go together: pruning output channel ``c`` of a layer
also removes row ``c`` of its bias, element ``c`` of the BatchNorm that follows, column ``c`` of every
consumer, channel ``c`` of the other operands of a residual ``add``, and so on. The analysis floods
the graph from a layer's weight rows, slot by slot; a *slot* is a value (a graph node, or a
parameter / buffer by FQN) and one of its dims, with the layout ``unit c ↦ [offset + c·width,
offset + (c+1)·width)``. How each op maps slots between its operands and its output is a table
(:data:`FUNCTIONS`, :data:`MODULES`, :data:`METHODS` → a rule in :data:`RULES`); adding an op is one
row. A slot that reaches something the table cannot map (a model input or output, a reduction or a
LayerNorm over the channel dim, a reshape that cuts across channels, an unknown op) makes its group
non-removable, with the node and the reason recorded.

    >>> plan = plan_channels(gm, spec, aliases, example_inputs=(x,))        # doctest: +SKIP
    >>> plan.groups[0].members[:3]                                          # doctest: +SKIP
    [Member('conv1.weight', dim=0), Member('conv1.bias', dim=0), Member('bn1.weight', dim=0)]

Masks: every parameter member of a removable group gets a mask (``channel_masks``), the consumers'
input columns included, so the masked module computes exactly what the shrunk one will (a pruned
channel's value after a non-zero-preserving op, e.g. ``sigmoid(0)``, never reaches a kept output: the
consumer's column is masked). Parameters not in any group keep their plain uses.

Groups no ``channels`` rule owns (``rule`` None) are planned for the layers whose input columns other
rules may zero (activation rules, ``ln_structured`` / ``random_structured`` with ``dim=1``); they get no
mask, and ``squash(shrink=True)`` removes the units whose consumer columns squash writes as all zero.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node

from ..schedule import scheduled_sparsity
from ..select import WeightTarget, select, select_layers
from ..spec import ChannelRule, SparsitySpec
from .channel_constants import ConstProgram, build_program

__all__ = [
    "CHANNELS",
    "ChannelGroup",
    "ChannelPlan",
    "Member",
    "Edit",
    "plan_channels",
    "channel_masks",
    "group_keeps",
    "shrink_plan_table",
    "shrink_summary",
    "shrunk_sizes",
    "passive_rules",
    "record_shapes",
    "map_reshape",
    "LAYER_WEIGHTS",
    "FUNCTIONS",
    "MODULES",
    "METHODS",
    "RULES",
]

#: the ``method`` name of every mask a channels rule owns (TargetRecord.method)
CHANNELS = "channels"

Value = Union[Node, str]  # a graph node, or a parameter / buffer by (canonical) FQN
OUT = -1  # operand position of an op's output
_log = logging.getLogger(__name__)


# --- the plan: plain data (strings and ints), so it pickles and deep-copies with the module ----------
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


@dataclass
class ChannelGroup:
    id: int
    units: int
    unit: str  # "channel" | "head"
    roots: list[str]
    members: list[Member] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    rule: int | None = None  # index into spec.channels
    removable: bool = True
    node: str | None = None
    reason: str | None = None
    heads_per_unit: int = 1  # heads groups: query heads per unit (GQA: a kv head and its query heads)
    constants: ConstProgram | None = None  # groups of zero rows (ln_structured dim=0): where their constants fold

    def member_names(self) -> list[str]:
        return list(dict.fromkeys(m.tensor for m in self.members))

    def unit_text(self) -> str:
        if self.unit == "head" and self.heads_per_unit > 1:
            return f"{self.units} kv heads ({self.heads_per_unit} query heads each)"
        return f"{self.units} {self.unit}s"


@dataclass
class ChannelPlan:
    groups: list[ChannelGroup]
    rules: tuple[ChannelRule, ...]

    def targets(self) -> dict[str, WeightTarget]:
        """Parameter FQN → a target for the mask it needs (members of removable groups)."""
        out: dict[str, WeightTarget] = {}
        for g in self.groups:
            if g.removable and g.rule is not None:
                for m in g.members:
                    if m.is_param:
                        out.setdefault(m.tensor, WeightTarget(m.tensor, self.rules[g.rule]))
        return out


class Unmappable(Exception):
    """A slot reached something the table cannot map. ``split``: the reshape's inner size, where one cut it."""

    def __init__(self, node: Node | None, reason: str, split: int | None = None) -> None:
        super().__init__(reason)
        self.node, self.reason, self.split = node, reason, split


# --- ops: a node seen as (kind, operands, extra) -----------------------------------------------------
@dataclass
class Op:
    kind: str
    node: Node
    operands: list[Value | None]
    extra: dict[str, Any] = field(default_factory=dict)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_args(node: Node) -> list[Value | None]:
    out: list[Value | None] = []
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, Node):
            out.append(a)
    return out


def _n_linear(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")], {}


def _n_conv(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    groups = _arg(node, 6, "groups", 1)
    loc = ("args", 6) if len(node.args) > 6 else ("kwargs", "groups") if "groups" in node.kwargs else None
    return [node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")], {"groups": groups, "groups_at": loc}


def _n_bn_functional(node: Node) -> tuple[list[Value | None], dict[str, Any]]:  # F.batch_norm(x, rm, rv, w, b)
    return [node.args[0], _arg(node, 3, "weight"), _arg(node, 4, "bias"), _arg(node, 1, "running_mean"),
            _arg(node, 2, "running_var")], {}


def _n_bn_aten(node: Node) -> tuple[list[Value | None], dict[str, Any]]:  # aten.batch_norm(x, w, b, rm, rv, ...)
    return [node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias"), _arg(node, 3, "running_mean"),
            _arg(node, 4, "running_var")], {}


def _n_layer_norm(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    shape = _arg(node, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    return [node.args[0], _arg(node, 2, "weight"), _arg(node, 3, "bias")], {"normalized": n}


def _n_x(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0]], {}


def _n_pointwise(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return _tensor_args(node), {}


def _n_dim(name: str, i: int, default: Any = None) -> Callable[[Node], tuple[list[Value | None], dict[str, Any]]]:
    def norm(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
        return [node.args[0]], {"dim": _arg(node, i, name, default)}

    return norm


def _n_reduce(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0]], {"dim": _arg(node, 1, "dim"), "keepdim": bool(_arg(node, 2, "keepdim", False))}


def _n_cat(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return list(_arg(node, 0, "tensors")), {"dim": _arg(node, 1, "dim", 0)}


def _n_split(equal_arg: str) -> Callable[[Node], tuple[list[Value | None], dict[str, Any]]]:
    def norm(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
        sizes = _arg(node, 1, equal_arg)
        return [node.args[0]], {"dim": _arg(node, 2, "dim", 0), "sizes": sizes}

    return norm


def _n_shape_args(first: int) -> Callable[[Node], tuple[list[Value | None], dict[str, Any]]]:
    """view / reshape / expand: where the output's sizes sit in the args (a list at ``first`` or varargs)."""

    def norm(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
        if len(node.args) == first + 1 and isinstance(node.args[first], (list, tuple)):
            at: Callable[[int], tuple[Any, ...] | None] = lambda d: ("args", first, d)  # noqa: E731
        elif len(node.args) > first:
            at = lambda d: ("args", first + d)  # noqa: E731
        else:
            at = lambda d: None  # noqa: E731
        return [node.args[0]], {"sizes_at": at}

    return norm


def _n_unflatten(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    dim = _arg(node, 1, "dim")
    return [node.args[0]], {"sizes_at": lambda d: ("args", 2, d - dim) if isinstance(dim, int) and dim >= 0 else None,
                            "unflatten_dim": dim}


def _n_transpose(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0]], {"swap": (_arg(node, 1, "dim0", 0), _arg(node, 2, "dim1", 1))}


def _n_permute(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    rest = node.args[1:]
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return [node.args[0]], {"perm": tuple(dims or node.kwargs.get("dims", ()))}


def _n_t(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0]], {"swap": (0, 1)}


def _n_matmul(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [node.args[0], node.args[1]], {}


def _n_sdpa(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    mask = _arg(node, 3, "attn_mask")
    return ([node.args[0], node.args[1], node.args[2], mask if isinstance(mask, Node) else None],
            {"scale": node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None),
             "gqa": bool(node.kwargs.get("enable_gqa", False))})


def _n_embedding(weight_first: bool) -> Callable[[Node], tuple[list[Value | None], dict[str, Any]]]:
    def norm(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
        w, idx = (node.args[0], node.args[1]) if weight_first else (node.args[1], node.args[0])
        return [idx, w], {}

    return norm


def _n_slice(node: Node) -> tuple[list[Value | None], dict[str, Any]]:  # aten.slice(x, dim, start, end, step)
    return [node.args[0]], {"dim": _arg(node, 1, "dim", 0), "start": _arg(node, 2, "start"),
                            "end": _arg(node, 3, "end"), "step": _arg(node, 4, "step", 1)}


def _n_select(node: Node) -> tuple[list[Value | None], dict[str, Any]]:  # aten.select(x, dim, index)
    return [node.args[0]], {"dim": _arg(node, 1, "dim")}


def _n_none(node: Node) -> tuple[list[Value | None], dict[str, Any]]:
    return [], {}


Normalizer = Callable[[Node], tuple[list[Value | None], dict[str, Any]]]
aten = torch.ops.aten

_POINTWISE_NAMES = (
    "add sub mul div truediv relu gelu silu sigmoid tanh dropout hardswish hardtanh relu6 leaky_relu elu selu neg "
    "abs exp sqrt rsqrt erf pow where clamp clamp_min clamp_max clone contiguous _to_copy to alias detach "
    "masked_fill hardsigmoid mish softplus log sin cos square reciprocal type_as float half bfloat16 "
    "feature_dropout alpha_dropout native_dropout lift_fresh_copy"
).split()

#: call_function targets (python callables and aten overload packets) → (rule kind, normalizer)
FUNCTIONS: dict[Any, tuple[str, Normalizer]] = {
    F.linear: ("linear", _n_linear), aten.linear: ("linear", _n_linear),
    F.conv1d: ("conv", _n_conv), F.conv2d: ("conv", _n_conv), F.conv3d: ("conv", _n_conv),
    aten.conv1d: ("conv", _n_conv), aten.conv2d: ("conv", _n_conv), aten.conv3d: ("conv", _n_conv),
    F.batch_norm: ("batch_norm", _n_bn_functional), aten.batch_norm: ("batch_norm", _n_bn_aten),
    F.layer_norm: ("layer_norm", _n_layer_norm), aten.layer_norm: ("layer_norm", _n_layer_norm),
    F.group_norm: ("group_norm", _n_x), aten.group_norm: ("group_norm", _n_x),
    operator.add: ("pointwise", _n_pointwise), operator.sub: ("pointwise", _n_pointwise),
    operator.mul: ("pointwise", _n_pointwise), operator.truediv: ("pointwise", _n_pointwise),
    operator.neg: ("pointwise", _n_pointwise), operator.iadd: ("pointwise", _n_pointwise),
    operator.imul: ("pointwise", _n_pointwise), operator.matmul: ("matmul", _n_matmul),
    torch.matmul: ("matmul", _n_matmul), torch.bmm: ("matmul", _n_matmul), aten.matmul: ("matmul", _n_matmul),
    aten.bmm: ("matmul", _n_matmul), aten.mm: ("matmul", _n_matmul),
    torch.cat: ("cat", _n_cat), torch.concat: ("cat", _n_cat), aten.cat: ("cat", _n_cat),
    torch.split: ("split", _n_split("split_size_or_sections")), aten.split: ("split", _n_split("split_size")),
    aten.split_with_sizes: ("split", _n_split("split_sizes")), torch.chunk: ("split", _n_split("chunks")),
    aten.chunk: ("split", _n_split("chunks")),
    torch.flatten: ("reshape", _n_x), aten.flatten: ("reshape", _n_x), torch.reshape: ("reshape", _n_shape_args(1)),
    aten.view: ("reshape", _n_shape_args(1)), aten.reshape: ("reshape", _n_shape_args(1)),
    aten._unsafe_view: ("reshape", _n_shape_args(1)), torch.squeeze: ("reshape", _n_x),
    aten.squeeze: ("reshape", _n_x), torch.unsqueeze: ("reshape", _n_x), aten.unsqueeze: ("reshape", _n_x),
    torch.unflatten: ("reshape", _n_unflatten), aten.unflatten: ("reshape", _n_unflatten),
    aten.expand: ("expand", _n_shape_args(1)),
    torch.transpose: ("transpose", _n_transpose), aten.transpose: ("transpose", _n_transpose),
    torch.permute: ("transpose", _n_permute), aten.permute: ("transpose", _n_permute),
    torch.t: ("transpose", _n_t), aten.t: ("transpose", _n_t),
    F.softmax: ("softmax", _n_dim("dim", 1)), torch.softmax: ("softmax", _n_dim("dim", 1)),
    F.log_softmax: ("softmax", _n_dim("dim", 1)), aten.softmax: ("softmax", _n_dim("dim", 1)),
    aten._softmax: ("softmax", _n_dim("dim", 1)), aten.log_softmax: ("softmax", _n_dim("dim", 1)),
    torch.mean: ("reduce", _n_reduce), torch.sum: ("reduce", _n_reduce), torch.amax: ("reduce", _n_reduce),
    aten.mean: ("reduce", _n_reduce), aten.sum: ("reduce", _n_reduce), aten.amax: ("reduce", _n_reduce),
    F.scaled_dot_product_attention: ("sdpa", _n_sdpa), aten.scaled_dot_product_attention: ("sdpa", _n_sdpa),
    torch.addmm: ("addmm", lambda n: ([n.args[0], n.args[1], n.args[2]], {})),
    aten.addmm: ("addmm", lambda n: ([n.args[0], n.args[1], n.args[2]], {})),
    F.embedding: ("embedding", _n_embedding(False)), aten.embedding: ("embedding", _n_embedding(True)),
    aten.slice: ("slice", _n_slice), aten.select: ("select", _n_select),
    operator.getitem: ("getitem", _n_x), getattr: ("shape", _n_none), aten.sym_size: ("shape", _n_none),
}
# the in-place forms too (``relu_``, ``add_``): torch.export keeps them (``nn.ReLU(inplace=True)``,
# ``out += identity``) and fx records ``x.relu_()`` / ``torch.relu_(x)``; they map channels as their
# out-of-place forms, and the constant analysis (channel_constants.py) keeps a channel whose value one
# of them rewrites under another reader
_INPLACE_POINTWISE_NAMES = [f"{name}_" for name in _POINTWISE_NAMES]
for _name in _POINTWISE_NAMES + _INPLACE_POINTWISE_NAMES:
    for _ns in (torch, F, aten):
        _fn = getattr(_ns, _name, None)
        if _fn is not None and callable(_fn):
            FUNCTIONS.setdefault(_fn, ("pointwise", _n_pointwise))
for _name, _k in (("adaptive_avg_pool", 0), ("adaptive_max_pool", 0), ("avg_pool", 0), ("max_pool", 0)):
    for _d in (1, 2, 3):
        for _ns in (F, aten, torch):
            _fn = getattr(_ns, f"{_name}{_d}d", None)
            if _fn is not None:
                FUNCTIONS.setdefault(_fn, ("pool", lambda n, d=_d: ([n.args[0]], {"spatial": d})))

#: call_method names → (rule kind, normalizer)
METHODS: dict[str, tuple[str, Normalizer]] = {
    **{name: ("pointwise", _n_pointwise) for name in _POINTWISE_NAMES + _INPLACE_POINTWISE_NAMES},
    "view": ("reshape", _n_shape_args(1)), "reshape": ("reshape", _n_shape_args(1)), "flatten": ("reshape", _n_x),
    "squeeze": ("reshape", _n_x), "unsqueeze": ("reshape", _n_x), "unflatten": ("reshape", _n_unflatten),
    "view_as": ("reshape", _n_x), "reshape_as": ("reshape", _n_x), "expand": ("expand", _n_shape_args(1)),
    "expand_as": ("expand", _n_x), "transpose": ("transpose", _n_transpose), "permute": ("transpose", _n_permute),
    "t": ("transpose", _n_t), "softmax": ("softmax", _n_dim("dim", 0)), "log_softmax": ("softmax", _n_dim("dim", 0)),
    "mean": ("reduce", _n_reduce), "sum": ("reduce", _n_reduce), "amax": ("reduce", _n_reduce),
    "split": ("split", _n_split("split_size")), "chunk": ("split", _n_split("chunks")), "matmul": ("matmul", _n_matmul),
    "size": ("shape", _n_none), "dim": ("shape", _n_none), "numel": ("shape", _n_none),
}

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity,
)
_POOLS: dict[type[nn.Module], int] = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
}

#: leaf module types → (rule kind, names of the parameters / buffers that are operands after the input)
MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.Linear: ("linear", ("weight", "bias")),
    nn.Conv1d: ("conv", ("weight", "bias")), nn.Conv2d: ("conv", ("weight", "bias")),
    nn.Conv3d: ("conv", ("weight", "bias")),
    nn.BatchNorm1d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.BatchNorm2d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.BatchNorm3d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.LayerNorm: ("layer_norm", ("weight", "bias")),
    nn.GroupNorm: ("group_norm", ()),
    nn.Embedding: ("embedding", ("weight",)),
    nn.Flatten: ("reshape", ()), nn.Unflatten: ("reshape", ()),
    nn.Softmax: ("softmax", ()), nn.LogSoftmax: ("softmax", ()),
    **{t: ("pointwise", ()) for t in _ELEMENTWISE_MODULES},
    **{t: ("pool", ()) for t in _POOLS},
}


class _Graph:
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
                return Op("unknown", node, _tensor_args(node), {"what": f"module {type(module).__name__}"})
            kind, names = entry
            prefix = f"{node.target}." if node.target else ""
            params: list[Value | None] = []
            for n in names:
                t = getattr(module, n, None)
                params.append(self.canonical(prefix + n) if isinstance(t, Tensor) else None)
            extra = self._module_extra(module, node)
            if kind == "pointwise":
                return Op(kind, node, _tensor_args(node), extra)
            return Op(kind, node, [node.args[0] if node.args else node.kwargs.get("input"), *params], extra)
        if node.op in ("call_function", "call_method"):
            if node.op == "call_method":
                entry = METHODS.get(str(node.target))
                what = f"method .{node.target}()"
            else:
                target = node.target
                entry = FUNCTIONS.get(target) or FUNCTIONS.get(getattr(target, "overloadpacket", None))
                what = f"function {getattr(target, '__name__', target)}"
            if entry is None:
                return Op("unknown", node, _tensor_args(node), {"what": what})
            kind, norm = entry
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
        if type(module) in _POOLS:
            return {"spatial": _POOLS[type(module)]}
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


# --- rules: (op, operand position, slot) → coupled slots -------------------------------------------
@dataclass(frozen=True)
class Slot:
    dim: int
    offset: int
    width: int


Coupling = tuple[Value, int, int, int]  # value, dim, offset, width


class _Ctx:
    def __init__(self, graph: _Graph, units: int) -> None:
        self.g, self.units = graph, units
        self.edits: list[Edit] = []

    def ndim(self, v: Value | None) -> int:
        s = self.g.shape(v)
        return -1 if s is None else len(s)

    def edit(self, op: Op, at: Any, width: int) -> None:
        if at is None:
            return
        if at[0] == "attr":
            self.edits.append(Edit("attr", str(op.node.target), (at[1],), width))
            return
        value = _at(op.node, at)
        if isinstance(value, int) and not isinstance(value, bool) and value != -1:
            self.edits.append(Edit("arg", op.node.name, tuple(at), width))


def _at(node: Node, path: tuple[Any, ...]) -> Any:
    value: Any = node.args if path[0] == "args" else node.kwargs
    for p in path[1:]:
        try:
            value = value[p]
        except (IndexError, KeyError, TypeError):
            return None
    return value


def _value(op: Op, pos: int) -> Value | None:
    return op.node if pos == OUT else op.operands[pos]


def _norm_dim(d: Any, ndim: int) -> int:
    return d + ndim if isinstance(d, int) and d < 0 else d


def r_pointwise(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    """Element-wise with broadcasting: dims line up from the right; a size-1 operand does not couple."""
    me = _value(op, pos)
    shape = ctx.g.shape(me)
    assert shape is not None
    r = len(shape) - s.dim
    out: list[Coupling] = []
    for v in [*op.operands, op.node]:
        if v is None or v is me:
            continue
        other = ctx.g.shape(v)
        if other is None or len(other) < r:
            continue
        d = len(other) - r
        if other[d] == 1 and shape[s.dim] != 1:
            continue
        if other[d] != shape[s.dim]:
            raise Unmappable(op.node, f"operand sizes {other} and {shape} do not line up on the channel dim")
        out.append((v, d, s.offset, s.width))
    return out


def r_expand(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    out = r_pointwise(op, pos, s, ctx)
    out_dim = s.dim if pos == OUT else next((d for v, d, *_ in out if v is op.node), None)
    if out_dim is not None and "sizes_at" in op.extra:
        ctx.edit(op, op.extra["sizes_at"](out_dim), s.width)
    return out


def r_attr(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    return [(op.operands[0], s.dim, s.offset, s.width)] if pos == OUT else [(op.node, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_linear(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x, w, b = op.operands
    o, k = s.offset, s.width
    last_x, last_out = ctx.ndim(x) - 1, ctx.ndim(op.node) - 1
    if pos == 0:
        return [(w, 1, o, k)] if s.dim == last_x else [(op.node, s.dim, o, k)]  # type: ignore[list-item]
    if pos == OUT and s.dim != last_out:
        return [(x, s.dim, o, k)]  # type: ignore[list-item]
    if pos == 1 and s.dim == 1:
        return [(x, last_x, o, k)]  # type: ignore[list-item]
    # the output features: weight rows, bias, output's last dim
    rows = [(w, 0, o, k), (b, 0, o, k), (op.node, last_out, o, k)]
    return [c for c in rows if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]


def r_conv(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x, w, b = op.operands
    o, k = s.offset, s.width
    wshape = ctx.g.shape(w)
    assert wshape is not None
    ch = ctx.ndim(x) - (len(wshape) - 1)  # 1 for batched input, 0 for unbatched
    groups = op.extra.get("groups", 1)
    if not isinstance(groups, int):
        raise Unmappable(op.node, "the convolution's groups is not a constant")
    c_in, c_out = wshape[1] * groups, wshape[0]
    if pos in (0, OUT) and s.dim != ch:
        if s.dim == 0 and ch == 1:
            return [(op.node if pos == 0 else x, 0, o, k)]  # type: ignore[list-item]
        raise Unmappable(op.node, "the convolution mixes values along this (spatial) dim")
    if groups == 1:
        if pos == 0 or (pos == 1 and s.dim == 1):
            return [(w, 1, o, k)] if pos == 0 else [(x, ch, o, k)]  # type: ignore[list-item]
        rows = [(w, 0, o, k), (b, 0, o, k), (op.node, ch, o, k)]
        return [c for c in rows if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]
    if groups == c_in and wshape[1] == 1 and (pos != 1 or s.dim == 0):  # depthwise, channel multiplier m
        m = c_out // c_in
        if pos == 0:
            o, k = o * m, k * m
        elif o % m or k % m:
            raise Unmappable(op.node, f"a depthwise convolution with multiplier {m} ties {m} output channels to each input")
        inner = [(w, 0, o, k), (b, 0, o, k), (op.node, ch, o, k), (x, ch, o // m, k // m)]
        ctx.edit(op, op.extra.get("groups_at"), k // m)
        return [c for c in inner if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]
    raise Unmappable(op.node, f"a grouped convolution (groups={groups}) ties channels in groups")


def r_batch_norm(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x = op.operands[0]
    o, k = s.offset, s.width
    if pos in (0, OUT) and s.dim != 1:
        return [(op.node if pos == 0 else x, s.dim, o, k)]  # type: ignore[list-item]
    everything = [(x, 1, o, k), (op.node, 1, o, k)] + [(v, 0, o, k) for v in op.operands[1:]]
    return [c for c in everything if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]


def r_layer_norm(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    n = op.extra.get("normalized", 1)
    nd = ctx.ndim(op.node)
    if pos in (0, OUT) and s.dim < nd - n:
        return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]
    raise Unmappable(op.node, "LayerNorm normalises over the channel dim (its mean and variance would change)")


def r_group_norm(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    raise Unmappable(op.node, "GroupNorm normalises over groups of channels")


def r_softmax(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    if _norm_dim(op.extra.get("dim"), nd) == s.dim or op.extra.get("dim") is None:
        raise Unmappable(op.node, "softmax normalises over the channel dim")
    return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_reduce(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.operands[0])
    dims = op.extra.get("dim")
    if dims is None:
        raise Unmappable(op.node, "a reduction over all dims mixes the channels")
    dims = {_norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = op.extra.get("keepdim", False)
    if pos == 0:
        if s.dim in dims:
            raise Unmappable(op.node, "a reduction over the channel dim mixes the channels")
        d = s.dim if keep else s.dim - sum(1 for r in dims if r < s.dim)
        return [(op.node, d, s.offset, s.width)]
    kept = [d for d in range(nd) if keep or d not in dims]
    return [(op.operands[0], kept[s.dim], s.offset, s.width)]  # type: ignore[list-item]


def r_pool(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    if s.dim >= nd - op.extra.get("spatial", 2):
        raise Unmappable(op.node, "pooling mixes values along this (spatial) dim")
    return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]


def map_reshape(src: tuple[int, ...], dst: tuple[int, ...], d: int, offset: int, width: int, units: int) -> tuple[int, int, int]:
    """Where dim ``d`` of a ``src``-shaped tensor goes in its ``dst``-shaped reshape: ``(dim, offset, width)``.

    Raises ``ValueError`` (with ``.split`` set for a dim split too finely) when the channels do not map
    onto whole index ranges of one dim.
    """
    prefix = math.prod(src[:d])
    n = src[d]
    # the dst dim holding the first element of src dim d: first dim whose prefix product reaches `prefix`
    a, acc = 0, 1
    while a < len(dst) and (acc < prefix or (acc == prefix and dst[a] == 1 and n != 1)):
        acc *= dst[a]
        a += 1
    if a == len(dst):
        raise ValueError("the reshape moves the channel dim out of place")
    if acc == prefix:  # dst dims a.. hold src dim d alone (same or split) or merge it with later src dims
        b, size = a, 1
        while b < len(dst) and size < n:
            size *= dst[b]
            b += 1
        if size == n:
            inner = math.prod(dst[a + 1:b])
            if width % inner or offset % inner:
                err = ValueError(f"the reshape splits the channel dim ({n}) into {list(dst[a:b])}")
                err.split = inner // math.gcd(width, inner)  # type: ignore[attr-defined]
                raise err
            return a, offset // inner, width // inner
        # merge: src dims d..e form dst dim a; d is the outermost of them
        e, size = d, 1
        while e < len(src) and size < dst[a]:
            size *= src[e]
            e += 1
        if size == dst[a]:
            inner = math.prod(src[d + 1:e])
            return a, offset * inner, width * inner
        raise ValueError("the reshape mixes the channel dim with its neighbours")
    # src dims before d merge with d into dst dim a-1: fine only when they are all 1
    raise ValueError("the reshape merges the channel dim under an outer dim")


def r_reshape(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x = op.operands[0]
    sx, so = ctx.g.shape(x), ctx.g.shape(op.node)
    if sx is None or so is None:
        raise Unmappable(op.node, "the reshape's shapes are unknown")
    src, dst, other = (sx, so, op.node) if pos == 0 else (so, sx, x)
    try:
        d, o, k = map_reshape(src, dst, s.dim, s.offset, s.width, ctx.units)
    except ValueError as err:
        raise Unmappable(op.node, str(err), getattr(err, "split", None)) from None
    out_dim, out_width = (d, k) if pos == 0 else (s.dim, s.width)
    if "sizes_at" in op.extra:
        ctx.edit(op, op.extra["sizes_at"](out_dim), out_width)
    return [(other, d, o, k)]  # type: ignore[list-item]


def r_transpose(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    if "swap" in op.extra:
        a, b = (_norm_dim(d, nd) for d in op.extra["swap"])
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    else:
        perm = [_norm_dim(d, nd) for d in op.extra["perm"]]
    if pos == 0:
        return [(op.node, perm.index(s.dim), s.offset, s.width)]
    return [(op.operands[0], perm[s.dim], s.offset, s.width)]  # type: ignore[list-item]


def r_cat(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    dim = _norm_dim(op.extra["dim"], nd)
    if s.dim != dim:
        return [(v, s.dim, s.offset, s.width) for v in [*op.operands, op.node] if v is not None and v is not _value(op, pos)]
    starts, at = [], 0
    for v in op.operands:
        starts.append(at)
        at += (ctx.g.shape(v) or (0,) * nd)[dim]
    if pos != OUT:
        return [(op.node, dim, s.offset + starts[pos], s.width)]
    lo, hi = s.offset, s.offset + ctx.units * s.width
    for v, start in zip(op.operands, starts):
        size = (ctx.g.shape(v) or (0,) * nd)[dim]
        if start <= lo and hi <= start + size:
            return [(v, dim, lo - start, s.width)]  # type: ignore[list-item]
    raise Unmappable(op.node, "the group's channels span several inputs of this cat")


def r_split(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x = op.operands[0]
    nd = ctx.ndim(x)
    dim = _norm_dim(op.extra["dim"], nd)
    pieces = [u for u in op.node.users if u.target is operator.getitem]
    if pos != 0:
        raise Unmappable(op.node, "split output used whole")
    if s.dim != dim:
        return [(u, s.dim, s.offset, s.width) for u in pieces]
    raise Unmappable(op.node, "split / chunk cuts the channel dim (a fused projection such as gate_up + chunk); "
                              "its pieces could not stay equal")


def r_getitem(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    source = op.operands[0]
    index = op.node.args[1]
    src_op = ctx.g.ops.get(source) if isinstance(source, Node) else None
    if src_op is not None and src_op.kind == "split":  # a piece of a split: only reached as a producer
        dim = _norm_dim(src_op.extra["dim"], ctx.ndim(op.node))
        if s.dim == dim:
            raise Unmappable(src_op.node, "split / chunk cuts the channel dim (a fused projection such as gate_up + "
                                          "chunk); its pieces could not stay equal")
        return [(src_op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]
    if ctx.g.shape(source) is None:
        raise Unmappable(op.node, "an item of a multi-output op")
    items = list(index) if isinstance(index, tuple) else [index]
    nd_in = ctx.ndim(source)
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (nd_in - consuming) if i is Ellipsis else [i]
    expanded += [slice(None)] * (nd_in - sum(1 for i in expanded if i is not None))
    mapping: dict[int, int | None] = {}
    full: dict[int, bool] = {}
    di = do = 0
    sin = ctx.g.shape(source) or ()
    for i in expanded:
        if i is None:
            do += 1
        elif isinstance(i, slice):
            mapping[di] = do
            full[di] = i.step in (None, 1) and i.start in (None, 0) and (i.stop is None or (isinstance(i.stop, int) and i.stop >= sin[di]))
            di, do = di + 1, do + 1
        elif isinstance(i, (int, Node)) and not (isinstance(i, Node) and ctx.g.shape(i) is not None):
            mapping[di] = None
            di += 1
        else:
            raise Unmappable(op.node, "advanced (tensor) indexing")
    if pos == 0:
        target = mapping.get(s.dim)
        if target is None or not full.get(s.dim, False):
            raise Unmappable(op.node, "indexing selects part of the channel dim")
        return [(op.node, target, s.offset, s.width)]
    back = {v: k for k, v in mapping.items() if v is not None}
    if s.dim not in back or not full[back[s.dim]]:
        raise Unmappable(op.node, "indexing selects part of the channel dim")
    return [(source, back[s.dim], s.offset, s.width)]  # type: ignore[list-item]


def r_slice(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    x = op.operands[0]
    nd = ctx.ndim(x)
    dim = _norm_dim(op.extra["dim"], nd)
    if s.dim == dim:
        size = (ctx.g.shape(x) or ())[dim]
        start, end, step = op.extra["start"], op.extra["end"], op.extra["step"]
        if not (start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= size))):
            raise Unmappable(op.node, "a slice selects part of the channel dim")
    return [(op.node if pos == 0 else x, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_select(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    nd = ctx.ndim(op.operands[0])
    dim = _norm_dim(op.extra["dim"], nd)
    if pos == 0:
        if s.dim == dim:
            raise Unmappable(op.node, "select picks one index of the channel dim")
        return [(op.node, s.dim - (s.dim > dim), s.offset, s.width)]
    return [(op.operands[0], s.dim + (s.dim >= dim), s.offset, s.width)]  # type: ignore[list-item]


def r_matmul(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    a, b = op.operands
    na, nb, no = ctx.ndim(a), ctx.ndim(b), ctx.ndim(op.node)
    if min(na, nb) < 2:
        raise Unmappable(op.node, "matmul with a 1-D operand")
    shape = {v: ctx.g.shape(v) for v in (a, b, op.node)}
    nd = {a: na, b: nb, op.node: no}
    me = _value(op, pos)
    r = nd[me] - s.dim  # position from the right
    o, k = s.offset, s.width
    if r == 1:
        return [(b, nb - 2, o, k)] if me is a else [(op.node, no - 1, o, k)] if me is b else [(b, nb - 1, o, k)]  # type: ignore[list-item]
    if r == 2:
        return [(op.node, no - 2, o, k)] if me is a else [(a, na - 1, o, k)] if me is b else [(a, na - 2, o, k)]  # type: ignore[list-item]
    out: list[Coupling] = []
    size = shape[me][s.dim]  # type: ignore[index]
    for v in (a, b, op.node):
        if v is me or nd[v] < r:
            continue
        d = nd[v] - r
        if shape[v][d] == size:  # type: ignore[index]
            out.append((v, d, o, k))  # type: ignore[arg-type]
    return out


def r_addmm(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    """``addmm(bias, x, w)`` with ``w`` of shape (in, out): a Linear with a transposed weight (HF ``Conv1D``)."""
    bias, x, w = op.operands
    o, k = s.offset, s.width
    if pos == 1:
        return [(w, 0, o, k)] if s.dim == 1 else [(op.node, 0, o, k)]  # type: ignore[list-item]
    if pos == 2 and s.dim == 0:
        return [(x, 1, o, k)]  # type: ignore[list-item]
    if pos == OUT and s.dim == 0:
        return [(x, 0, o, k)]  # type: ignore[list-item]
    cols = [(w, 1, o, k), (bias, ctx.ndim(bias) - 1, o, k), (op.node, 1, o, k)]
    return [c for c in cols if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]


def r_sdpa(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    q, k_, v, mask = op.operands
    if op.extra.get("gqa"):
        raise Unmappable(op.node, "scaled_dot_product_attention with enable_gqa")
    me = _value(op, pos)
    nd = ctx.ndim(me)
    r = nd - s.dim
    o, w = s.offset, s.width
    if r == 1:
        if me in (q, k_):
            if op.extra.get("scale") is None:
                raise Unmappable(op.node, "the default scale 1/sqrt(head size) of scaled_dot_product_attention "
                                          "would change with the head size")
            return [(k_ if me is q else q, ctx.ndim(q) - 1, o, w)]  # type: ignore[list-item]
        return [(op.node if me is v else v, ctx.ndim(v) - 1, o, w)]  # type: ignore[list-item]
    if r == 2:
        pairs = [(q, op.node), (k_, v)]
        for x, y in pairs:
            if me in (x, y):
                return [(y if me is x else x, ctx.ndim(y if me is x else x) - 2, o, w)]  # type: ignore[list-item]
    out: list[Coupling] = []
    size = (ctx.g.shape(me) or ())[s.dim]
    for t in (q, k_, v, mask, op.node):
        if t is None or t is me or ctx.ndim(t) < r:
            continue
        d = ctx.ndim(t) - r
        if (ctx.g.shape(t) or ())[d] == size:
            out.append((t, d, o, w))
        elif t is not mask:
            raise Unmappable(op.node, "the attention operands' batch dims do not line up (GQA inside the kernel)")
    return out


def r_embedding(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    idx, w = op.operands
    last = ctx.ndim(op.node) - 1
    if pos == 1:
        if s.dim == 0:
            raise Unmappable(op.node, "embedding rows are looked up by index")
        return [(op.node, last, s.offset, s.width)]
    if pos == OUT and s.dim == last:
        return [(w, 1, s.offset, s.width)]  # type: ignore[list-item]
    return [(op.node if pos == 0 else idx, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_shape(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    return []  # reads the size only; a size read from a shrunk dim is read again at run time


def r_unknown(op: Op, pos: int, s: Slot, ctx: _Ctx) -> list[Coupling]:
    raise Unmappable(op.node, f"no channel rule for {op.extra.get('what', op.node.target)}")


Rule = Callable[[Op, int, Slot, _Ctx], list[Coupling]]
#: rule kind → how it maps a slot on one operand (or the output, position -1) to the coupled slots
RULES: dict[str, Rule] = {
    "attr": r_attr, "linear": r_linear, "conv": r_conv, "batch_norm": r_batch_norm, "layer_norm": r_layer_norm,
    "group_norm": r_group_norm, "pointwise": r_pointwise, "expand": r_expand, "softmax": r_softmax,
    "reduce": r_reduce, "pool": r_pool, "reshape": r_reshape, "transpose": r_transpose, "cat": r_cat,
    "split": r_split, "getitem": r_getitem, "slice": r_slice, "select": r_select, "matmul": r_matmul,
    "sdpa": r_sdpa, "addmm": r_addmm, "embedding": r_embedding, "shape": r_shape, "unknown": r_unknown,
}


# --- the flood ---------------------------------------------------------------------------------------
class _Flood:
    """All slots coupled to a seed slot; raises :class:`Unmappable` at the first slot it cannot map."""

    def __init__(self, graph: _Graph, units: int) -> None:
        self.g = graph
        self.ctx = _Ctx(graph, units)
        self.slots: dict[tuple[Value, int], tuple[int, int]] = {}
        self.members: list[Member] = []
        self.done: set[tuple[Node, int, int]] = set()

    def run(self, seed: Value, dim: int, width: int) -> None:
        work: list[Coupling] = [(seed, dim, 0, width)]
        while work:
            value, d, o, k = work.pop()
            key = (value, d)
            if key in self.slots:
                if self.slots[key] != (o, k):
                    node = value if isinstance(value, Node) else None
                    raise Unmappable(node, "the value is reached twice with different channel layouts")
                continue
            self.slots[key] = (o, k)
            if isinstance(value, str):
                self._member(value, d, o, k)
                for node, pos in self.g.reads.get(value, []):
                    work += self._apply(node, pos, Slot(d, o, k))
                continue
            work += self._apply(value, OUT, Slot(d, o, k))
            for user in value.users:
                op = self.g.ops.get(user)
                if user.op == "output":
                    raise Unmappable(value, "it reaches the model's output (its shape must not change)")
                if op is None:
                    continue
                for pos, operand in enumerate(op.operands):
                    if operand is value:
                        work += self._apply(user, pos, Slot(d, o, k))

    def _member(self, tensor: str, d: int, o: int, k: int) -> None:
        is_param = True
        try:
            self.g.gm.get_parameter(tensor)
        except AttributeError:
            is_param = False
        self.members.append(Member(tensor, d, o, k, is_param))

    def _apply(self, node: Node, pos: int, s: Slot) -> list[Coupling]:
        if node.op == "placeholder":
            raise Unmappable(node, f"it comes from the model input {node.target!r}")
        op = self.g.ops.get(node)
        if op is None:
            raise Unmappable(node, f"no channel rule for {node.op} {node.target}")
        if (node, pos, s.dim) in self.done:
            return []
        self.done.add((node, pos, s.dim))
        try:
            out = RULES[op.kind](op, pos, s, self.ctx)
        except Unmappable:
            raise
        except Exception as exc:  # a rule met an argument form it does not know: refuse, naming the node
            raise Unmappable(node, f"cannot map channels through it ({type(exc).__name__}: {exc})") from exc
        return [c for c in out if c[0] is not None]


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


def record_shapes(gm: GraphModule, example_inputs: tuple[Any, ...] | None, example_kwargs: dict[str, Any] | None) -> dict[Node, Any]:
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


# --- planning ----------------------------------------------------------------------------------------
def _uses(graph: _Graph, tensor: str) -> list[tuple[Op, int]]:
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


#: rule kind → (operand position of a layer's weight, its dim of output channels, its dim of input channels)
LAYER_WEIGHTS: dict[str, tuple[int, int, int]] = {"linear": (1, 0, 1), "conv": (1, 0, 1), "addmm": (2, 1, 0)}


def _out_dim(graph: _Graph, tensor: str, kinds: tuple[str, ...] = ("linear", "conv", "addmm"), which: int = 1) -> int | None:
    """The dim of ``tensor`` holding output (``which=2``: input) channels when every use is a layer's weight."""
    dims = {LAYER_WEIGHTS[op.kind][which] if op.kind in kinds and pos == LAYER_WEIGHTS[op.kind][0] else None
            for op, pos in _uses(graph, tensor)}
    return dims.pop() if len(dims) == 1 else None


def _is_layer_weight(graph: _Graph, tensor: str, kinds: tuple[str, ...] = ("linear", "conv", "addmm")) -> bool:
    return _out_dim(graph, tensor, kinds) is not None


def plan_channels(
    gm: GraphModule,
    spec: SparsitySpec,
    model: nn.Module,
    aliases: Mapping[str, str],
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> ChannelPlan:
    """The channel groups of ``gm`` seeded by ``spec.channels`` (``model``: the user's model, for selection)."""
    try:
        shapes = record_shapes(gm, example_inputs, example_kwargs)
    except ValueError:
        if spec.channels:
            raise
        return ChannelPlan([], spec.channels)  # only other rules' zeros to shrink: an optional extra, skipped
    graph = _Graph(gm, aliases, shapes)
    groups: list[ChannelGroup] = []
    owner: dict[tuple[str, int], ChannelGroup] = {}  # (tensor, dim) → the group holding it
    order = {name: i for i, name in enumerate(gm.state_dict(keep_vars=True))}  # members listed in model order

    def add_group(root: str, width: int, unit: str, rule: int | None, allow_coarsen: bool,
                  dim: int | None = None, rows: bool = False) -> ChannelGroup | None:
        rows = graph.shape(root)
        assert rows is not None
        dim = _out_dim(graph, root) if dim is None else dim
        assert dim is not None
        existing = owner.get((root, dim))
        if existing is not None:
            if rule is not None:
                existing.rule = rule
            if rows and existing.removable and existing.rule is None and existing.constants is None:
                again = _Flood(graph, existing.units)  # a columns group that zero rows may shrink too
                again.run(existing.roots[0], next(m.dim for m in existing.members if m.tensor == existing.roots[0]), 1)
                existing.constants = _program(graph, again, root)
            return existing
        w = width
        while True:
            flood = _Flood(graph, rows[dim] // w)
            try:
                flood.run(root, dim, w)
                err = None
                break
            except Unmappable as exc:
                if allow_coarsen and exc.split and rows[dim] % (w * exc.split) == 0:
                    w *= exc.split
                    continue
                err = exc
                break
        if unit == "head" and w == width:
            return None  # no reshape into heads downstream: not a head projection
        members = sorted((dataclasses.replace(m, consumer=m.is_param and _out_dim(graph, m.tensor, which=2) == m.dim)
                          for m in flood.members), key=lambda m: (order.get(m.tensor, len(order)), m.dim))
        group = ChannelGroup(len(groups), rows[dim] // w, unit, [root], members, flood.ctx.edits, rule)
        group.edits = list(dict.fromkeys(group.edits))
        if err is not None and rule is None and not rows:
            return None  # a group only other rules' zeros could shrink, and it cannot: nothing to say
        if err is None and rows and rule is None:
            group.constants = _program(graph, flood, root)
        if err is not None:
            group.removable = False
            group.node = err.node.format_node() if err.node is not None else None
            group.reason = err.reason + ("; prune whole heads with a 'heads' rule" if err.split and unit == "channel" else "")
            group.edits = []
        for m in group.members:
            owner.setdefault((m.tensor, m.dim), group)
            if m.tensor != root and m.is_param and _out_dim(graph, m.tensor) == m.dim:
                group.roots.append(m.tensor)
        groups.append(group)
        return group

    for i, rule in enumerate(spec.channels):
        where = f"spec['channels'][{i}] ({rule.target!r})"
        if rule.heads is None:
            roots = select(rule.target, model, dict(aliases), where)
            for root in roots:
                if not _is_layer_weight(graph, root):
                    raise ValueError(
                        f"{where}: {root!r} is not the weight of a Linear, Conv or Conv1D (addmm) layer in the captured "
                        "graph; a channels rule prunes the output channels of such layers"
                    )
                add_group(root, 1, "channel", i, allow_coarsen=False)
        else:
            found = []
            selected = select_layers(rule.target, model, where)
            for module in selected:
                prefix = f"{module}."
                for name in list(dict.fromkeys(aliases.values())):
                    if name.startswith(prefix) and _is_layer_weight(graph, name, ("linear", "addmm")):
                        group = add_group(name, 1, "head", i, allow_coarsen=True)
                        if group is not None and group not in found:
                            found.append(group)
            if not found:
                packed = [f"{m}.{n}".strip(".") for m in selected for n, sub in model.get_submodule(m).named_modules()
                          if isinstance(sub, nn.MultiheadAttention)]
                raise ValueError(
                    f"{where}: no attention heads found: a heads rule needs Linear projections inside the selected "
                    "module(s) whose outputs are reshaped into (heads, head_dim)"
                    + (f"; {packed[0]!r} is an nn.MultiheadAttention, whose packed in_proj_weight and (T, B*H, D) "
                       "views cannot lose heads: prune its feed-forward layers with a 'channels' rule instead, or "
                       "rebuild the attention from separate q / k / v Linear layers" if packed else "")
                )
            for group in found:
                _heads_per_unit(graph, group)
    for weight, in_dim in _passive_seeds(spec, model, aliases, graph):
        add_group(weight, 1, "channel", None, allow_coarsen=False, dim=in_dim)
    for weight, out_dim in _row_seeds(spec, model, aliases, graph):  # zero rows: their constants fold (item 5)
        add_group(weight, 1, "channel", None, allow_coarsen=False, dim=out_dim, rows=True)
    plan = ChannelPlan(groups, spec.channels)
    _check_rules(plan)
    return plan


def passive_rules(spec: SparsitySpec) -> bool:
    """Whether rules other than ``channels`` may zero whole input channels of a layer (SPEC §10, item 5)."""
    return bool(spec.activations) or any(_column_rule(r) or _row_rule(r) for r in spec.weights)


def _column_rule(rule: Any) -> bool:
    return rule.method in ("ln_structured", "random_structured") and rule.options.get("dim", 0) in (1, -1)


def _program(graph: _Graph, flood: _Flood, root: str) -> ConstProgram | None:
    """The constant program of a zero-rows group; an optional analysis, so a failure only means no shrink."""
    try:
        return build_program(graph, flood)
    except Exception as exc:  # noqa: BLE001  (the weight rule works without it; say so in the log)
        _log.warning("zero rows of %s will not shrink: the constant analysis failed (%s: %s)", root,
                     type(exc).__name__, exc)
        return None


def _row_rule(rule: Any) -> bool:
    return rule.method in ("ln_structured", "random_structured")


def _row_seeds(spec: SparsitySpec, model: nn.Module, aliases: Mapping[str, str], graph: _Graph) -> list[tuple[str, int]]:
    """Layer weights whose whole output rows a structured weight rule may zero (its ``dim`` is the output dim)."""
    out: list[tuple[str, int]] = []
    for i, wrule in enumerate(spec.weights):
        if not _row_rule(wrule):
            continue
        for name in select(wrule.target, model, dict(aliases), f"spec['weights'][{i}]"):
            shape, out_dim = graph.shape(name), _out_dim(graph, name)
            if shape is None or out_dim is None:
                continue
            dim = wrule.options.get("dim", 0)
            if isinstance(dim, int) and dim % len(shape) == out_dim and (name, out_dim) not in out:
                out.append((name, out_dim))
    return out


def _passive_seeds(spec: SparsitySpec, model: nn.Module, aliases: Mapping[str, str], graph: _Graph) -> list[tuple[str, int]]:
    """Layer weights whose input columns other rules may zero: activation rules' layers, column-structured rules."""
    weights: list[str] = []
    for i, arule in enumerate(spec.activations):
        for layer in select_layers(arule.target, model, f"spec['activations'][{i}]"):
            name = aliases.get(f"{layer}.weight" if layer else "weight")
            if name is not None:
                weights.append(name)
    for i, wrule in enumerate(spec.weights):
        if _column_rule(wrule):
            weights += select(wrule.target, model, dict(aliases), f"spec['weights'][{i}]")
    out = []
    for name in dict.fromkeys(weights):
        in_dim = _out_dim(graph, name, which=2)
        shape = graph.shape(name)
        if in_dim is not None and shape is not None:
            out.append((name, in_dim))
    return out


def _heads_per_unit(graph: _Graph, group: ChannelGroup) -> None:
    """Query heads per unit: the widest root's rows per unit over the narrowest (a kv head's own width)."""
    widths = [m.width for m in group.members if m.tensor in group.roots and m.dim == _out_dim(graph, m.tensor)]
    if widths and group.removable:
        group.heads_per_unit = max(widths) // min(widths)


def _check_rules(plan: ChannelPlan) -> None:
    """No silent no-op: a rule all of whose groups are non-removable is an error naming why."""
    for i, rule in enumerate(plan.rules):
        mine = [g for g in plan.groups if g.rule == i]
        if mine and not any(g.removable for g in mine):
            why = "; ".join(f"{g.roots[0]}: {g.reason} at {g.node}" for g in mine[:3])
            raise ValueError(
                f"spec['channels'][{i}] ({rule.target!r}): none of its channel groups can be removed ({why}). "
                "Select other layers, or see sgm.shrink_plan() for the groups"
            )


# --- masks -------------------------------------------------------------------------------------------
def _unit_view(t: Tensor, m: Member, units: int) -> Tensor:
    """``t`` restricted to the member's slice, as ``(units, rest)``."""
    moved = t.movedim(m.dim, 0)[m.offset:m.offset + units * m.width]
    return moved.reshape(units, -1)


def _group_scores(gm: GraphModule, group: ChannelGroup, masks: Mapping[str, Tensor], p: float) -> Tensor:
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        if not m.is_param:
            continue
        t = gm.get_parameter(m.tensor).detach()
        if not t.is_floating_point():
            continue
        mask = masks.get(m.tensor)
        if mask is not None:
            t = t * mask.to(t.dtype)
        norms = torch.linalg.vector_norm(_unit_view(t, m, group.units).float(), ord=p, dim=1).double().cpu()
        if math.isinf(p):
            total = torch.maximum(total, norms)
        else:
            total += norms ** p
    return total if math.isinf(p) else total ** (1.0 / p)


def _amount(rule: ChannelRule, steps: int) -> float | int:
    base = rule.sparsity if rule.heads is None else rule.heads
    if rule.schedule is not None:
        return scheduled_sparsity(rule.schedule, float(base or 0.0), steps)
    return base  # type: ignore[return-value]


def _kept_count(rule: ChannelRule, group: ChannelGroup, amount: float | int, where: str, fractional: bool | None = None) -> int:
    """How many units of ``group`` stay: ``amount`` pruned (a fraction or a count), rounded and bounded."""
    n = group.units
    fractional = isinstance(amount, float) if fractional is None else fractional
    if rule.heads is not None:
        heads = n * group.heads_per_unit
        pruned_heads = round(amount * heads) if isinstance(amount, float) else int(amount)
        if pruned_heads % group.heads_per_unit:
            raise ValueError(
                f"{where}: {pruned_heads} of {heads} query heads requested in group {group.id}, but under grouped-query "
                f"attention each kv head goes with its {group.heads_per_unit} query heads; ask for a multiple of "
                f"{group.heads_per_unit} heads"
            )
        pruned = pruned_heads // group.heads_per_unit
        round_to = rule.round_to or 1
    else:
        pruned = round(amount * n) if isinstance(amount, float) else int(amount)
        round_to = rule.round_to if rule.round_to is not None else (8 if fractional and n > 32 else 1)
    if pruned > n:
        raise ValueError(f"{where}: asks to prune {pruned} units of group {group.id}, which has only {n}")
    kept = n - pruned
    if round_to > 1 and kept % round_to:
        kept = max(round_to, round_to * round(kept / round_to))
    return min(n, max(kept, rule.min_channels))


def channel_masks(gm: GraphModule, plan: ChannelPlan, masks: Mapping[str, Tensor], steps: int) -> dict[str, Tensor]:
    """Parameter FQN → new keep-mask for every member of a removable group (``masks``: the current ones)."""
    keeps: dict[int, Tensor] = {}
    for i, rule in enumerate(plan.rules):
        where = f"spec['channels'][{i}] ({rule.target!r})"
        mine = [g for g in plan.groups if g.rule == i and g.removable]
        if not mine:
            continue
        amount = _amount(rule, steps)
        scores = {g.id: _group_scores(gm, g, masks, float(rule.p)) for g in mine}
        if rule.global_ and rule.heads is None and len(mine) > 1:
            flat = torch.cat([scores[g.id] for g in mine])
            n_prune = round(amount * flat.numel()) if isinstance(amount, float) else int(amount)
            if n_prune > flat.numel():
                raise ValueError(f"{where}: asks to prune {n_prune} channels of {flat.numel()}")
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[torch.argsort(flat, stable=True)[:n_prune]] = True
            at = 0
            for g in mine:
                share = int(chosen[at:at + g.units].sum())
                at += g.units
                keeps[g.id] = _keep_lowest(scores[g.id], _kept_count(rule, g, share, where, isinstance(amount, float)))
        else:
            for g in mine:
                keeps[g.id] = _keep_lowest(scores[g.id], _kept_count(rule, g, amount, where))
    out: dict[str, Tensor] = {}
    for g in plan.groups:
        if g.id not in keeps:
            continue
        pruned = (~keeps[g.id]).nonzero().flatten().tolist()
        for m in g.members:
            if not m.is_param:
                continue
            if m.tensor not in out:
                out[m.tensor] = torch.ones(gm.get_parameter(m.tensor).shape, dtype=torch.bool)
            if pruned:
                out[m.tensor].index_fill_(m.dim, torch.tensor(m.indices(pruned), dtype=torch.long), False)
    return out


def _keep_lowest(scores: Tensor, kept: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
    return keep


def group_keeps(plan: ChannelPlan, masks: Mapping[str, Tensor], consumers: Mapping[str, Tensor] | None = None) -> dict[int, Tensor]:
    """Group id → keep vector over its units, read back from the members' masks (a unit is pruned when every
    parameter member's slice of it is masked). A group no channels rule owns (``rule`` None) drops the units
    whose consumer columns are all zero in ``consumers`` (the weights as squash will write them)."""
    out: dict[int, Tensor] = {}
    for g in plan.groups:
        if not g.removable:
            continue
        if g.rule is None:
            keep = torch.zeros(g.units, dtype=torch.bool)
            found = False
            for m in g.members:
                if m.consumer and consumers is not None and m.tensor in consumers:
                    found = True
                    keep |= _unit_view(consumers[m.tensor].detach().cpu() != 0, m, g.units).any(dim=1)
            out[g.id] = keep if found and bool(keep.any()) else torch.ones(g.units, dtype=torch.bool)
            continue
        keep = torch.zeros(g.units, dtype=torch.bool)
        seen = False
        for m in g.members:
            mask = masks.get(m.tensor)
            if mask is None or not m.is_param:
                continue
            seen = True
            keep |= _unit_view(mask.cpu() != 0, m, g.units).any(dim=1)
        out[g.id] = keep if seen else torch.ones(g.units, dtype=torch.bool)
    return out


def shrunk_sizes(gm: GraphModule, plan: ChannelPlan, keeps: Mapping[int, Tensor]) -> dict[str, tuple[int, ...]]:
    """Member tensor → its shape after ``squash(shrink=True)`` (only tensors that shrink)."""
    removed: dict[str, dict[int, set[int]]] = {}
    for g in plan.groups:
        keep = keeps.get(g.id)
        if not g.removable or keep is None or bool(keep.all()):
            continue
        pruned = (~keep).nonzero().flatten().tolist()
        for m in g.members:
            removed.setdefault(m.tensor, {}).setdefault(m.dim, set()).update(m.indices(pruned))
    out = {}
    for name, dims in removed.items():
        shape = list(_Graph.tensor_shape(gm, name) or ())
        for d, idx in dims.items():
            shape[d] -= len(idx)
        out[name] = tuple(shape)
    return out


def shrink_summary(gm: GraphModule, plan: ChannelPlan, keeps: Mapping[int, Tensor]) -> str:
    """One line for the report: groups, and the parameters ``squash(shrink=True)`` leaves."""
    params = {n: p for n, p in gm.named_parameters()}
    before = sum(p.numel() for p in params.values())
    after = before
    for name, shape in shrunk_sizes(gm, plan, keeps).items():
        if name in params:
            after -= params[name].numel() - math.prod(shape)
    removable = sum(1 for g in plan.groups if g.removable)
    return (f"channels: {len(plan.groups)} groups, {removable} removable; squash(shrink=True) keeps {after:,} of "
            f"{before:,} parameters ({after / max(before, 1):.1%}); see sgm.shrink_plan()")


def shrink_plan_table(plan: ChannelPlan, keeps: Mapping[int, Tensor], notes: Mapping[int, str] | None = None) -> str:
    """The ``sgm.shrink_plan()`` table: one row per group (``notes``: why some channels of a removable group stay)."""
    from tabulate import tabulate

    rows = []
    for g in plan.groups:
        names = g.member_names()
        members = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
        kept = int(keeps[g.id].sum()) if g.id in keeps else g.units
        rule = f"channels[{g.rule}]" if g.rule is not None else "other rules' zeros"
        rows.append([g.id, rule, g.unit_text(), members, f"{g.units} → {kept}", "yes" if g.removable else "no",
                     g.node or "", g.reason or (notes or {}).get(g.id, "")])
    removable = sum(1 for g in plan.groups if g.removable)
    head = f"fx_sparsify shrink plan: {len(plan.groups)} channel groups, {removable} removable"
    return head + "\n" + tabulate(rows, headers=["group", "from", "unit", "members", "before → after", "removable", "node",
                                                 "reason"], tablefmt="github")
