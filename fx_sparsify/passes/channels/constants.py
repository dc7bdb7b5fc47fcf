"""Analysis: which pruned channels of a group carry a constant, and where that constant folds (SPEC §10).

A weight rule that zeroes whole output rows (``ln_structured`` / ``random_structured`` with ``dim=0``)
leaves the pruned channel emitting its bias, which the coupled ops then transform (BatchNorm's shift,
``act(bias)``). Such a channel can still be removed when the value it carries to every consumer is a
constant independent of the input and of the position: the consumer's input columns times that
constant are added to the consumer's bias, so the shrunk module computes what the masked one does.

At planning time (:func:`build_program`) the group's flood is turned into a :class:`ConstProgram`,
plain data that pickles with the plan: one :class:`ConstStep` per coupled graph value in graph order,
one :class:`Fold` per consumer (a ``Linear`` / ``Conv`` / ``Conv1D`` reading the channel as an input
column) and the *sinks* where a channel's value goes but cannot be folded (a matmul, attention).
:func:`evaluate` runs the program on the tensors as squash writes them and returns, per unit, its
constant or "not constant" with the reason. How each op kind carries a per-channel constant is a table
(:data:`STEP_KINDS`):

======================  ==================================================================
``layer``               a producer: its bias where its weight rows are all zero, else not constant
``batch_norm``          ``(c - mean) / sqrt(var + eps) * weight + bias`` (running statistics)
``pointwise``           the op itself applied to the constants (scalars and coupled tensors only)
``pass``                reshapes, transposes, concatenation, pooling, ``mean``: the value unchanged
``tensor``              a coupled parameter (layer scale): its slice, when one value per channel
``var``                 anything else: not constant (the reason is kept for ``shrink_plan()``)
======================  ==================================================================

A consumer folds a non-zero constant only when it has a bias of its own (one nothing else reads) and,
for a convolution, no zero padding (at the border a padded tap would see 0, not the constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from .._runner import writes_in_place
from .graph import ChannelGraph, uses
from .ops import LAYERS
from .rules import Flood

__all__ = [
    "ConstStep",
    "Fold",
    "ConstProgram",
    "UnitConstants",
    "STEP_KINDS",
    "build_program",
    "evaluate",
    "fold_deltas",
]

#: op kinds (rules.RULES) that carry a per-channel constant unchanged
PASS_KINDS = (
    "attr",
    "reshape",
    "transpose",
    "expand",
    "getitem",
    "slice",
    "select",
    "cat",
    "split",
    "pool",
    "reduce",
    "repeat_interleave",
)

TensorGetter = Callable[[str], Tensor]


@dataclass(frozen=True)
class ConstStep:
    """How one coupled value's per-channel constant follows from its inputs (see :data:`STEP_KINDS`)."""

    node: str
    kind: str
    dim: int
    offset: int
    width: int
    inputs: tuple[str, ...] = ()  # coupled input values (node names)
    tensors: tuple[
        str | None, ...
    ] = ()  # layer: (weight, bias); batch_norm: (weight, bias, mean, var); tensor: (name,)
    eps: float = 1e-5
    why: str = ""  # kind "var": why the value is not a constant
    at: tuple[tuple[int, str], ...] = ()  # pointwise: (position among the node's Node arguments, coupled input)
    rewritten: str = ""  # why the value is not constant after all: an in-place op rewrites it under another reader


@dataclass(frozen=True)
class Fold:
    """A consumer reading the group's channels as input columns of ``weight`` along ``dim``."""

    node: str
    x: str  # the consumer's input value (node name)
    weight: str
    dim: int
    offset: int
    width: int
    bias: str | None
    why_not: str = ""  # set when a non-zero constant cannot be folded here (no bias, zero padding, shared bias)


@dataclass
class ConstProgram:
    steps: list[ConstStep] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    sinks: list[tuple[str, str]] = field(default_factory=list)  # (node, why a value reaching it cannot fold)


@dataclass
class UnitConstants:
    """Per unit of a group: removable by folding, the constant at each fold, and why a zero-row unit stays."""

    removable: Tensor  # bool (units,)
    zero_rows: Tensor  # bool (units,): a producer's weight rows are all zero there
    at_fold: dict[int, Tensor]  # fold index → constant per unit (valid where ``removable``)
    why: dict[int, str]  # unit → reason it stays (zero-row units only)


# --- planning ----------------------------------------------------------------------------------------
def _name(graph: ChannelGraph, v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Node) and v.op == "get_attr":
        return graph.canonical(str(v.target))
    return None


def _eps(graph: ChannelGraph, node: Node) -> float:
    if node.op == "call_module":
        return float(getattr(graph.gm.get_submodule(str(node.target)), "eps", 1e-5))
    eps: Any = node.args[7] if len(node.args) > 7 else node.kwargs.get("eps", 1e-5)
    return float(eps)


def _batch_stats(graph: ChannelGraph, node: Node) -> bool:
    """Whether a batch norm normalises with the batch's statistics (no running statistics to fold)."""
    if node.op == "call_module":
        m = graph.gm.get_submodule(str(node.target))
        return getattr(m, "running_mean", None) is None
    return node.args[5] is True if len(node.args) > 5 else node.kwargs.get("training") is True


def _out_channel_dim(graph: ChannelGraph, node: Node, kind: str, weight: str) -> int | None:
    """The dim of a layer's output holding its output channels."""
    shape, wshape = graph.shape(node), graph.shape(weight)
    if shape is None or wshape is None:
        return None
    if kind == "conv":
        return len(shape) - (len(wshape) - 1)
    return len(shape) - 1


def _padding_why(graph: ChannelGraph, node: Node) -> str:
    """Why a convolution consumer cannot take a non-zero constant into its bias ('' when it can)."""
    if node.op == "call_module":
        m = graph.gm.get_submodule(str(node.target))
        padding, mode = getattr(m, "padding", 0), getattr(m, "padding_mode", "zeros")
    else:
        padding, mode = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0), "zeros"
    values = [padding] if isinstance(padding, (int, str)) else list(padding)
    if mode == "zeros" and any(p not in (0, "valid") for p in values):
        return (
            f"{node.name} pads with zeros: at the border its taps see 0, not the pruned channel's constant, "
            "so the constant does not fold into its bias"
        )
    return ""


def _avg_pool_padded(graph: ChannelGraph, node: Node) -> bool:
    target = node.target
    if node.op == "call_module":
        m = graph.gm.get_submodule(str(target))
        name, padding = type(m).__name__.lower(), getattr(m, "padding", 0)
    else:
        name = str(getattr(target, "__name__", target)).lower()
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
    if "avg" not in name or "adaptive" in name:
        return False
    values = [padding] if isinstance(padding, int) else list(padding)
    return any(p != 0 for p in values)


def build_program(graph: ChannelGraph, flood: Flood) -> ConstProgram:
    """The constant program of a flooded group (see the module docstring)."""
    slots: dict[Node, tuple[int, int, int]] = {}
    for (value, d), (o, k) in flood.slots.items():
        if isinstance(value, Node):
            slots.setdefault(value, (d, o, k))
    prog = ConstProgram()
    for node in graph.gm.graph.nodes:
        if node not in slots:
            continue
        d, o, k = slots[node]
        op = graph.ops.get(node)
        kind = op.kind if op is not None else "none"
        coupled = tuple(v.name for v in (op.operands if op is not None else []) if isinstance(v, Node) and v in slots)
        split = graph.ops.get(node.args[0]) if kind == "getitem" and isinstance(node.args[0], Node) else None
        if split is not None and split.kind == "split":
            source = split.operands[0]
            coupled = (source.name,) if isinstance(source, Node) and source in slots else ()
        if kind in LAYERS and op is not None:
            _, w_at, b_at, rows, _ = LAYERS[kind]
            weight, bias = _name(graph, op.operands[w_at]), _name(graph, op.operands[b_at])
            if weight is not None and d == _out_channel_dim(graph, node, kind, weight):
                step = ConstStep(node.name, "layer", rows, o, k, coupled, (weight, bias))
            else:
                step = ConstStep(node.name, "var", d, o, k, why=f"{node.name} mixes the channel with others")
        elif kind == "batch_norm" and op is not None and not _batch_stats(graph, node):
            names = tuple(_name(graph, v) for v in op.operands[1:5])
            step = ConstStep(node.name, "batch_norm", d, o, k, coupled, names, _eps(graph, node))
        elif kind == "pointwise":
            at = tuple((i, a.name) for i, a in enumerate(_node_args(node)) if a in slots)
            step = ConstStep(node.name, "pointwise", d, o, k, coupled, at=at)
        elif kind == "attr" and op is not None:
            step = ConstStep(node.name, "tensor", d, o, k, (), (_name(graph, op.operands[0]),))
        elif (
            kind in PASS_KINDS
            and not (kind == "reduce" and "sum" in str(getattr(node.target, "__name__", node.target)))
            and not (kind == "pool" and _avg_pool_padded(graph, node))
        ):
            step = ConstStep(node.name, "pass", d, o, k, coupled)
        else:
            step = ConstStep(node.name, "var", d, o, k, why=f"{node.name} ({kind}) does not carry a constant through")
        prog.steps.append(step)
    _rewritten_values(prog, slots)
    for node, pos, _dim in sorted(flood.done, key=lambda t: (t[0].name, t[1])):
        op = graph.ops.get(node)
        if pos < 0 or op is None or op.kind == "shape":
            continue
        if op.kind in LAYERS:
            x_at, w_at, b_at, _, cols = LAYERS[op.kind]
            if pos != x_at:
                continue  # the layer's own parameters, reached through its input columns
            x, weight = op.operands[x_at], _name(graph, op.operands[w_at])
            member = next((m for m in flood.members if m.tensor == weight and m.dim == cols), None)
            if member is None and node in slots:
                continue  # a depthwise convolution: the channel goes on to its output (a step)
            if not isinstance(x, Node) or member is None:
                prog.sinks.append((node.name, f"{node.name} reads the channel in a way that cannot take a constant"))
                continue
            bias = _name(graph, op.operands[b_at])
            why = "" if bias is not None else f"{node.name} has no bias to take the pruned channel's constant"
            if not why and len(uses(graph, bias)) > 1:  # type: ignore[arg-type]
                why = f"{node.name}'s bias {bias} is read elsewhere too"
            if not why and op.kind == "conv":
                why = _padding_why(graph, node)
            prog.folds.append(Fold(node.name, x.name, weight, cols, member.offset, member.width, bias, why))  # type: ignore[arg-type]
        elif node not in slots:
            prog.sinks.append(
                (
                    node.name,
                    f"the channel reaches {node.name} ({op.kind}), where a constant cannot be folded into a bias",
                )
            )
    return prog


def _rewritten_values(prog: ConstProgram, slots: Mapping[Node, Any]) -> None:
    """Make a coupled value that an in-place op rewrites (``nn.ReLU(inplace=True)``, ``x.relu_()``) not
    constant when another node reads it too: that reader sees the rewritten value, not the constant the
    program gives the value itself, so its channel stays rather than folding a wrong constant."""
    at = {step.node: i for i, step in enumerate(prog.steps)}
    for node in slots:
        if not node.args or not writes_in_place(node):
            continue
        value = node.args[0]
        if not isinstance(value, Node) or value.name not in at or len(value.users) < 2:
            continue
        others = ", ".join(sorted(u.name for u in value.users if u is not node))
        prog.steps[at[value.name]] = replace(
            prog.steps[at[value.name]],
            rewritten=f"{node.name} rewrites {value.name} in place and {others} read(s) it too",
        )


# --- evaluation --------------------------------------------------------------------------------------
class _Var(Exception):
    pass


def _per_unit(t: Tensor, dim: int, offset: int, width: int, units: int) -> tuple[Tensor, Tensor]:
    """``t``'s slice per unit → (one value per unit, whether the unit's slice holds one value only)."""
    view = t.detach().movedim(dim, 0)[offset : offset + units * width].reshape(units, -1).double().cpu()
    first = view[:, 0]
    return first, (view == first[:, None]).all(dim=1)


def _node_args(node: Node) -> list[Node]:
    """``node``'s Node arguments in order (rewrites that swap an argument for another node keep the order)."""
    found: list[Node] = []
    map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, Node) else None)
    return found


def _nodes(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes}


def _pointwise(gm: GraphModule, node: Node, step: ConstStep, values: Mapping[str, Tensor], get: TensorGetter) -> Tensor:
    """Apply ``node``'s op to per-unit constants (1-D tensors); raises _Var on a non-constant operand."""
    positions = dict(step.at)
    args_in_order = _node_args(node)
    coupled = {
        id(args_in_order[i]): values[name].clone()  # an in-place op (ReLU(inplace=True)) must not
        for i, name in positions.items()
        if i < len(args_in_order)
    }  # rewrite its input's constants

    def sub(a: Any) -> Any:
        if not isinstance(a, Node):
            return a
        if id(a) in coupled:
            return coupled[id(a)]
        if a.op == "get_attr":
            t = get(str(a.target))
            if t.numel() == 1:
                return t.detach().reshape(()).double().cpu()
        raise _Var

    args, kwargs = map_aggregate(node.args, sub), map_aggregate(node.kwargs, sub)
    with torch.no_grad():
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            training = module.training
            module.eval()
            try:
                return module(*args, **kwargs).double()
            finally:
                module.train(training)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs).double()
        out = node.target(*args, **kwargs)  # type: ignore[operator]
        if not isinstance(out, Tensor):
            raise _Var
        return out.double()


def evaluate(gm: GraphModule, units: int, prog: ConstProgram, get: TensorGetter) -> UnitConstants:
    """Run ``prog`` on the tensors as ``get`` returns them (as squash writes them); ``gm`` supplies the ops
    of ``pointwise`` steps by node name. A unit is removable when a producer's rows are zero there and its
    value reaches every consumer as a constant that the consumer can take (or its columns are zero);
    ``units``: the group's."""
    no = torch.zeros(units, dtype=torch.bool)
    values: dict[str, Tensor] = {}  # node → constant per unit
    known: dict[str, Tensor] = {}  # node → bool per unit: the value is that constant
    why_var: dict[str, str] = {}  # node → why (some of) its units are not constant
    zero_rows = no.clone()
    nodes = _nodes(gm)
    for s in prog.steps:
        val, ok, why = torch.zeros(units, dtype=torch.float64), no, ""
        ins = [known.get(i, no) for i in s.inputs]
        worst = min(s.inputs, key=lambda i: int(known.get(i, no).sum()), default=None)  # the least constant input
        inherited = why_var.get(worst, "") if worst is not None else ""
        if s.kind == "layer":
            weight, bias = s.tensors
            assert weight is not None
            rows = get(weight).detach().movedim(s.dim, 0)[s.offset : s.offset + units * s.width].reshape(units, -1)
            zero = (rows == 0).all(dim=1).cpu()
            zero_rows |= zero
            val, uniform = (
                (torch.zeros(units, dtype=torch.float64), ~no)
                if bias is None
                else _per_unit(get(bias), get(bias).dim() - 1, s.offset, s.width, units)
            )
            ok, why = zero & uniform, f"{s.node} also produces them and its weight rows there are not all zero"
        elif s.kind == "batch_norm" and ins:
            w, b, mean, var = (None if n is None else _per_unit(get(n), 0, s.offset, s.width, units) for n in s.tensors)
            if mean is not None and var is not None:
                val = (values[s.inputs[0]] - mean[0]) / torch.sqrt(var[0] + s.eps)
                ok = ins[0] & mean[1] & var[1]
                for p, op in ((w, torch.mul), (b, torch.add)):
                    if p is not None:
                        val, ok = op(val, p[0]), ok & p[1]
            why = inherited
        elif s.kind == "pointwise" and ins:
            try:
                val = _pointwise(gm, nodes[s.node], s, values, get).reshape(-1).expand(units).clone()
                ok, why = torch.stack(ins).all(dim=0), inherited
            except _Var:
                why = f"{s.node} combines the channel with a value that is not a constant"
            except Exception as exc:  # an op we cannot evaluate on per-channel constants: not a constant
                why = f"{s.node} could not be evaluated on the constants ({type(exc).__name__})"
        elif s.kind == "pass" and ins:
            val, ok, why = values[s.inputs[0]], ins[0], inherited
        elif s.kind == "tensor":
            assert s.tensors[0] is not None
            val, ok = _per_unit(get(s.tensors[0]), s.dim, s.offset, s.width, units)
            why = f"{s.tensors[0]} has more than one value per channel"
        else:
            why = s.why or f"{s.node} does not carry a constant through"
        if s.rewritten:  # a layer's zero rows still count; its value is not the constant its readers see
            ok, why = no, s.rewritten
        values[s.node], known[s.node], why_var[s.node] = val, ok, why

    removable = zero_rows.clone()
    reasons: dict[int, str] = {}

    def stay(mask: Tensor, reason: str) -> None:
        for u in (removable & mask).nonzero().flatten().tolist():
            reasons.setdefault(u, reason)
        removable.copy_(removable & ~mask)

    for _node, reason in prog.sinks:
        stay(~no, reason)
    at_fold: dict[int, Tensor] = {}
    for i, f in enumerate(prog.folds):
        const, ok = values.get(f.x, torch.zeros(units, dtype=torch.float64)), known.get(f.x, no)
        fold_w = get(f.weight).detach()
        cols_zero = (
            (fold_w.movedim(f.dim, 0)[f.offset : f.offset + units * f.width].reshape(units, -1) == 0).all(1).cpu()
        )
        stay(~ok & ~cols_zero, why_var.get(f.x) or f"the channel's value at {f.node} is not a constant")
        if f.why_not:
            stay(ok & ~cols_zero & (const != 0), f.why_not)
        at_fold[i] = torch.where(ok & ~cols_zero, const, torch.zeros_like(const))
    return UnitConstants(removable, zero_rows, at_fold, reasons)


def fold_deltas(
    gm_tensors: TensorGetter, units: int, prog: ConstProgram, consts: UnitConstants, pruned: Tensor
) -> dict[str, Tensor]:
    """Bias name → what to add to it so that removing the ``pruned`` units (bool per unit, of a group of
    ``units``) is exact."""
    out: dict[str, Tensor] = {}
    for i, f in enumerate(prog.folds):
        const = torch.where(pruned, consts.at_fold[i], torch.zeros_like(consts.at_fold[i]))
        if not bool((const != 0).any()):
            continue
        assert f.bias is not None and not f.why_not, "a constant was planned into a consumer that cannot take it"
        w = gm_tensors(f.weight).detach()
        cols = w.movedim(f.dim, 0)  # (in, out, ...)
        cols = cols.reshape(cols.shape[0], cols.shape[1], -1).sum(-1).double()
        per_col = const.repeat_interleave(f.width)
        part = cols[f.offset : f.offset + units * f.width]
        delta = (per_col[:, None].to(part.device) * part).sum(0)
        bias = gm_tensors(f.bias)
        out[f.bias] = out.get(f.bias, torch.zeros(bias.shape, dtype=torch.float64, device=bias.device)) + delta
    return out


#: step kind → what it means (documentation of the table :func:`evaluate` implements)
STEP_KINDS: dict[str, str] = {
    "layer": "a producer: its bias where its weight rows are all zero",
    "batch_norm": "(c - running_mean) / sqrt(running_var + eps) * weight + bias",
    "pointwise": "the op applied to the per-channel constants",
    "pass": "the value unchanged (layout, pooling, mean)",
    "tensor": "a coupled parameter's value per channel",
    "var": "not a constant",
}
