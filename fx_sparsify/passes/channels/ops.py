"""The channel analysis' op tables: each graph node seen as an op (a rule kind, its operands, a few facts).

A node is seen as an :class:`Op`: a rule *kind* (``"linear"``, ``"pointwise"``, ``"reshape"``, …), its
tensor operands in a fixed order and a few extra facts (a convolution's ``groups``, a reduction's
``dim``). Which kind a function, method or leaf module has, and where its operands sit, is a table
(:data:`FUNCTIONS`, :data:`METHODS`, :data:`MODULES`); adding an op is one row. :data:`LAYERS` says where
a layer op keeps its input, weight and bias and which weight dims hold its output and input channels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

__all__ = [
    "Value",
    "OUT",
    "Op",
    "Normalizer",
    "FUNCTIONS",
    "METHODS",
    "MODULES",
    "POOLS",
    "LayerOperands",
    "LAYERS",
    "node_arg",
    "arg_at",
    "tensor_args",
]

Value = Union[Node, str]  # a graph node, or a parameter / buffer by (canonical) FQN
#: a normalizer's answer: the op's operands as the node holds them (nodes, FQNs, None or a constant), its extras
Normalized = tuple[list[Any], dict[str, Any]]
OUT = -1  # operand position of an op's output


@dataclass
class Op:
    kind: str
    node: Node
    operands: list[Value | None]
    extra: dict[str, Any] = field(default_factory=dict)


def node_arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def arg_at(node: Node, path: tuple[Any, ...]) -> Any:
    value: Any = node.args if path[0] == "args" else node.kwargs
    for p in path[1:]:
        try:
            value = value[p]
        except (IndexError, KeyError, TypeError):
            return None
    return value


def tensor_args(node: Node) -> list[Value | None]:
    out: list[Value | None] = []
    for a in (*node.args, *node.kwargs.values()):
        if isinstance(a, Node):
            out.append(a)
    return out


def _n_linear(node: Node) -> Normalized:
    return [node.args[0], node_arg(node, 1, "weight"), node_arg(node, 2, "bias")], {}


def _n_conv(node: Node) -> Normalized:
    groups = node_arg(node, 6, "groups", 1)
    loc = ("args", 6) if len(node.args) > 6 else ("kwargs", "groups") if "groups" in node.kwargs else None
    return [node.args[0], node_arg(node, 1, "weight"), node_arg(node, 2, "bias")], {"groups": groups, "groups_at": loc}


def _n_bn_functional(node: Node) -> Normalized:  # F.batch_norm(x, rm, rv, w, b)
    return [
        node.args[0],
        node_arg(node, 3, "weight"),
        node_arg(node, 4, "bias"),
        node_arg(node, 1, "running_mean"),
        node_arg(node, 2, "running_var"),
    ], {}


def _n_bn_aten(node: Node) -> Normalized:  # aten.batch_norm(x, w, b, rm, rv, ...)
    return [
        node.args[0],
        node_arg(node, 1, "weight"),
        node_arg(node, 2, "bias"),
        node_arg(node, 3, "running_mean"),
        node_arg(node, 4, "running_var"),
    ], {}


def _n_layer_norm(node: Node) -> Normalized:
    shape = node_arg(node, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    return [node.args[0], node_arg(node, 2, "weight"), node_arg(node, 3, "bias")], {"normalized": n}


def _n_x(node: Node) -> Normalized:
    return [node.args[0]], {}


def _n_pointwise(node: Node) -> Normalized:
    return tensor_args(node), {}


def _n_dim(name: str, i: int, default: Any = None) -> Callable[[Node], Normalized]:
    def norm(node: Node) -> Normalized:
        return [node.args[0]], {"dim": node_arg(node, i, name, default)}

    return norm


def _n_reduce(node: Node) -> Normalized:
    return [node.args[0]], {"dim": node_arg(node, 1, "dim"), "keepdim": bool(node_arg(node, 2, "keepdim", False))}


def _n_cat(node: Node) -> Normalized:
    return list(node_arg(node, 0, "tensors")), {"dim": node_arg(node, 1, "dim", 0)}


def _n_split(equal_arg: str) -> Callable[[Node], Normalized]:
    def norm(node: Node) -> Normalized:
        sizes = node_arg(node, 1, equal_arg)
        return [node.args[0]], {"dim": node_arg(node, 2, "dim", 0), "sizes": sizes}

    return norm


def _n_shape_args(first: int) -> Callable[[Node], Normalized]:
    """view / reshape / expand: where the output's sizes sit in the args (a list at ``first`` or varargs)."""

    def norm(node: Node) -> Normalized:
        if len(node.args) == first + 1 and isinstance(node.args[first], (list, tuple)):
            at: Callable[[int], tuple[Any, ...] | None] = lambda d: ("args", first, d)  # noqa: E731
        elif len(node.args) > first:
            at = lambda d: ("args", first + d)  # noqa: E731
        else:
            at = lambda d: None  # noqa: E731
        return [node.args[0]], {"sizes_at": at}

    return norm


def _n_unflatten(node: Node) -> Normalized:
    dim = node_arg(node, 1, "dim")
    return [node.args[0]], {
        "sizes_at": lambda d: ("args", 2, d - dim) if isinstance(dim, int) and dim >= 0 else None,
        "unflatten_dim": dim,
    }


def _n_transpose(node: Node) -> Normalized:
    return [node.args[0]], {"swap": (node_arg(node, 1, "dim0", 0), node_arg(node, 2, "dim1", 1))}


def _n_permute(node: Node) -> Normalized:
    rest = node.args[1:]
    dims: Any = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    perm: Any = dims or node.kwargs.get("dims", ())
    return [node.args[0]], {"perm": tuple(perm)}


def _n_t(node: Node) -> Normalized:
    return [node.args[0]], {"swap": (0, 1)}


def _n_matmul(node: Node) -> Normalized:
    return [node.args[0], node.args[1]], {}


def _n_sdpa(node: Node) -> Normalized:
    mask = node_arg(node, 3, "attn_mask")
    return (
        [node.args[0], node.args[1], node.args[2], mask if isinstance(mask, Node) else None],
        {
            "scale": node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None),
            "gqa": bool(node.kwargs.get("enable_gqa", False)),
        },
    )


def _n_embedding(weight_first: bool) -> Callable[[Node], Normalized]:
    def norm(node: Node) -> Normalized:
        w, idx = (node.args[0], node.args[1]) if weight_first else (node.args[1], node.args[0])
        return [idx, w], {}

    return norm


def _n_slice(node: Node) -> Normalized:  # aten.slice(x, dim, start, end, step)
    return [node.args[0]], {
        "dim": node_arg(node, 1, "dim", 0),
        "start": node_arg(node, 2, "start"),
        "end": node_arg(node, 3, "end"),
        "step": node_arg(node, 4, "step", 1),
    }


def _n_select(node: Node) -> Normalized:  # aten.select(x, dim, index)
    return [node.args[0]], {"dim": node_arg(node, 1, "dim")}


def _n_repeat_interleave(node: Node) -> Normalized:  # repeat_interleave(x, repeats, dim, *, output_size)
    at = ("args", 3) if len(node.args) > 3 else ("kwargs", "output_size") if "output_size" in node.kwargs else None
    return [node.args[0]], {
        "repeats": node_arg(node, 1, "repeats"),
        "dim": node_arg(node, 2, "dim"),
        "output_size_at": at,
    }


def _n_none(node: Node) -> Normalized:
    return [], {}


Normalizer = Callable[[Node], Normalized]
aten = torch.ops.aten

# fmt: off  (the op tables keep related ops on one line)
_POINTWISE_NAMES = (
    "add sub mul div truediv relu gelu silu sigmoid tanh dropout hardswish hardtanh relu6 leaky_relu elu selu neg "
    "abs exp sqrt rsqrt erf pow where clamp clamp_min clamp_max clone contiguous _to_copy to alias detach "
    "masked_fill hardsigmoid mish softplus log sin cos square reciprocal type_as float half bfloat16 "
    "feature_dropout alpha_dropout native_dropout lift_fresh_copy"
).split()

#: call_function targets (python callables and aten overload packets) → (rule kind, normalizer)
FUNCTIONS: dict[Any, tuple[str, Normalizer]] = {
    F.linear: ("linear", _n_linear),
    aten.linear: ("linear", _n_linear),
    F.conv1d: ("conv", _n_conv),
    F.conv2d: ("conv", _n_conv),
    F.conv3d: ("conv", _n_conv),
    aten.conv1d: ("conv", _n_conv),
    aten.conv2d: ("conv", _n_conv),
    aten.conv3d: ("conv", _n_conv),
    F.batch_norm: ("batch_norm", _n_bn_functional),
    aten.batch_norm: ("batch_norm", _n_bn_aten),
    F.layer_norm: ("layer_norm", _n_layer_norm),
    aten.layer_norm: ("layer_norm", _n_layer_norm),
    F.group_norm: ("group_norm", _n_x),
    aten.group_norm: ("group_norm", _n_x),
    operator.add: ("pointwise", _n_pointwise),
    operator.sub: ("pointwise", _n_pointwise),
    operator.mul: ("pointwise", _n_pointwise),
    operator.truediv: ("pointwise", _n_pointwise),
    operator.neg: ("pointwise", _n_pointwise),
    operator.iadd: ("pointwise", _n_pointwise),
    operator.imul: ("pointwise", _n_pointwise),
    operator.matmul: ("matmul", _n_matmul),
    torch.matmul: ("matmul", _n_matmul),
    torch.bmm: ("matmul", _n_matmul),
    aten.matmul: ("matmul", _n_matmul),
    aten.bmm: ("matmul", _n_matmul),
    aten.mm: ("matmul", _n_matmul),
    torch.cat: ("cat", _n_cat),
    torch.concat: ("cat", _n_cat),
    aten.cat: ("cat", _n_cat),
    torch.split: ("split", _n_split("split_size_or_sections")),
    aten.split: ("split", _n_split("split_size")),
    aten.split_with_sizes: ("split", _n_split("split_sizes")),
    torch.chunk: ("split", _n_split("chunks")),
    aten.chunk: ("split", _n_split("chunks")),
    torch.flatten: ("reshape", _n_x),
    aten.flatten: ("reshape", _n_x),
    torch.reshape: ("reshape", _n_shape_args(1)),
    aten.view: ("reshape", _n_shape_args(1)),
    aten.reshape: ("reshape", _n_shape_args(1)),
    aten._unsafe_view: ("reshape", _n_shape_args(1)),
    torch.squeeze: ("reshape", _n_x),
    aten.squeeze: ("reshape", _n_x),
    torch.unsqueeze: ("reshape", _n_x),
    aten.unsqueeze: ("reshape", _n_x),
    torch.unflatten: ("reshape", _n_unflatten),
    aten.unflatten: ("reshape", _n_unflatten),
    aten.expand: ("expand", _n_shape_args(1)),
    torch.transpose: ("transpose", _n_transpose),
    aten.transpose: ("transpose", _n_transpose),
    torch.permute: ("transpose", _n_permute),
    aten.permute: ("transpose", _n_permute),
    torch.t: ("transpose", _n_t),
    aten.t: ("transpose", _n_t),
    F.softmax: ("softmax", _n_dim("dim", 1)),
    torch.softmax: ("softmax", _n_dim("dim", 1)),
    F.log_softmax: ("softmax", _n_dim("dim", 1)),
    aten.softmax: ("softmax", _n_dim("dim", 1)),
    aten._softmax: ("softmax", _n_dim("dim", 1)),
    aten.log_softmax: ("softmax", _n_dim("dim", 1)),
    torch.mean: ("reduce", _n_reduce),
    torch.sum: ("reduce", _n_reduce),
    torch.amax: ("reduce", _n_reduce),
    aten.mean: ("reduce", _n_reduce),
    aten.sum: ("reduce", _n_reduce),
    aten.amax: ("reduce", _n_reduce),
    F.scaled_dot_product_attention: ("sdpa", _n_sdpa),
    aten.scaled_dot_product_attention: ("sdpa", _n_sdpa),
    torch.addmm: ("addmm", lambda n: ([n.args[0], n.args[1], n.args[2]], {})),
    aten.addmm: ("addmm", lambda n: ([n.args[0], n.args[1], n.args[2]], {})),
    F.embedding: ("embedding", _n_embedding(False)),
    aten.embedding: ("embedding", _n_embedding(True)),
    aten.slice: ("slice", _n_slice),
    aten.select: ("select", _n_select),
    torch.repeat_interleave: ("repeat_interleave", _n_repeat_interleave),
    aten.repeat_interleave: ("repeat_interleave", _n_repeat_interleave),
    operator.getitem: ("getitem", _n_x),
    getattr: ("shape", _n_none),
    aten.sym_size: ("shape", _n_none),
}
# the in-place forms too (``relu_``, ``add_``): torch.export keeps them (``nn.ReLU(inplace=True)``,
# ``out += identity``) and fx records ``x.relu_()`` / ``torch.relu_(x)``; they map channels as their
# out-of-place forms, and the constant analysis (constants.py) keeps a channel whose value one
# of them rewrites under another reader
_INPLACE_POINTWISE_NAMES = [f"{name}_" for name in _POINTWISE_NAMES]
for _name in _POINTWISE_NAMES + _INPLACE_POINTWISE_NAMES:
    for _ns in (torch, F, aten):
        _fn = getattr(_ns, _name, None)
        if _fn is not None and callable(_fn):
            FUNCTIONS.setdefault(_fn, ("pointwise", _n_pointwise))


def _n_pool(spatial: int) -> Normalizer:
    def norm(node: Node) -> Normalized:
        return [node.args[0]], {"spatial": spatial}

    return norm


for _name, _k in (("adaptive_avg_pool", 0), ("adaptive_max_pool", 0), ("avg_pool", 0), ("max_pool", 0)):
    for _d in (1, 2, 3):
        for _ns in (F, aten, torch):
            _fn = getattr(_ns, f"{_name}{_d}d", None)
            if _fn is not None:
                FUNCTIONS.setdefault(_fn, ("pool", _n_pool(_d)))

#: call_method names → (rule kind, normalizer)
METHODS: dict[str, tuple[str, Normalizer]] = {
    **{name: ("pointwise", _n_pointwise) for name in _POINTWISE_NAMES + _INPLACE_POINTWISE_NAMES},
    "view": ("reshape", _n_shape_args(1)),
    "reshape": ("reshape", _n_shape_args(1)),
    "flatten": ("reshape", _n_x),
    "squeeze": ("reshape", _n_x),
    "unsqueeze": ("reshape", _n_x),
    "unflatten": ("reshape", _n_unflatten),
    "view_as": ("reshape", _n_x),
    "reshape_as": ("reshape", _n_x),
    "expand": ("expand", _n_shape_args(1)),
    "expand_as": ("expand", _n_x),
    "transpose": ("transpose", _n_transpose),
    "permute": ("transpose", _n_permute),
    "t": ("transpose", _n_t),
    "softmax": ("softmax", _n_dim("dim", 0)),
    "log_softmax": ("softmax", _n_dim("dim", 0)),
    "mean": ("reduce", _n_reduce),
    "sum": ("reduce", _n_reduce),
    "amax": ("reduce", _n_reduce),
    "split": ("split", _n_split("split_size")),
    "chunk": ("split", _n_split("chunks")),
    "matmul": ("matmul", _n_matmul),
    "repeat_interleave": ("repeat_interleave", _n_repeat_interleave),
    "size": ("shape", _n_none),
    "dim": ("shape", _n_none),
    "numel": ("shape", _n_none),
}

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
POOLS: dict[type[nn.Module], int] = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
}

#: leaf module types → (rule kind, names of the parameters / buffers that are operands after the input)
MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.Linear: ("linear", ("weight", "bias")),
    nn.Conv1d: ("conv", ("weight", "bias")),
    nn.Conv2d: ("conv", ("weight", "bias")),
    nn.Conv3d: ("conv", ("weight", "bias")),
    nn.BatchNorm1d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.BatchNorm2d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.BatchNorm3d: ("batch_norm", ("weight", "bias", "running_mean", "running_var")),
    nn.LayerNorm: ("layer_norm", ("weight", "bias")),
    nn.GroupNorm: ("group_norm", ()),
    nn.Embedding: ("embedding", ("weight",)),
    nn.Flatten: ("reshape", ()),
    nn.Unflatten: ("reshape", ()),
    nn.Softmax: ("softmax", ()),
    nn.LogSoftmax: ("softmax", ()),
    **{t: ("pointwise", ()) for t in _ELEMENTWISE_MODULES},
    **{t: ("pool", ()) for t in POOLS},
}
# fmt: on


class LayerOperands(NamedTuple):
    """Where a layer op keeps its operands, and which dims of its weight hold its channels."""

    input: int  # operand position of the layer's input
    weight: int  # of its weight
    bias: int  # of its bias
    out_dim: int  # the weight's dim of output channels (rows)
    in_dim: int  # the weight's dim of input channels (columns)


#: layer rule kind → its operands (one table for the flood, the planner and the constant analysis)
LAYERS: dict[str, LayerOperands] = {
    "linear": LayerOperands(0, 1, 2, 0, 1),
    "conv": LayerOperands(0, 1, 2, 0, 1),
    "addmm": LayerOperands(1, 2, 0, 1, 0),
}
