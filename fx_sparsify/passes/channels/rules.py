"""The op → channel rules as data, and the flood that follows them from a seed slot.

A *slot* is a value (a graph node, or a parameter / buffer by FQN) and one of its dims, with the layout
``unit c ↦ [offset + c·width, offset + (c+1)·width)``. A rule maps a slot on one operand of an op (or on
its output, position :data:`~.graph.OUT`) to the slots coupled to it; :data:`RULES` holds one rule per
op kind of :mod:`.graph`'s tables. :class:`Flood` collects every slot coupled to a seed and raises
:class:`~.graph.Unmappable`, naming the node, at the first slot no rule can map (a model input or output,
a reduction or a LayerNorm over the channel dim, a reshape that cuts across channels, an unknown op).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import Node

from .graph import ChannelGraph, Edit, Member, Unmappable
from .ops import OUT, Op, Value, arg_at
from .reshape import map_reshape, size_reads

__all__ = ["Slot", "Coupling", "RuleContext", "Rule", "RULES", "Flood", "map_reshape"]


# --- rules: (op, operand position, slot) → coupled slots -------------------------------------------
@dataclass(frozen=True)
class Slot:
    dim: int
    offset: int
    width: int


Coupling = tuple[Value, int, int, int]  # value, dim, offset, width


class RuleContext:
    def __init__(self, graph: ChannelGraph, units: int) -> None:
        self.g, self.units = graph, units
        self.edits: list[Edit] = []
        self.runtime: list[tuple[Node, Node, list[tuple[Node, int]] | None]] = []  # (op, size node, sizes it reads)

    def ndim(self, v: Value | None) -> int:
        s = self.g.shape(v)
        return -1 if s is None else len(s)

    def edit(self, op: Op, at: Any, width: int, runtime: bool = False) -> None:
        """Rewrite the size at ``at`` to ``width``. ``runtime``: a size computed at run time there is refused
        unless it reads the size of one of the group's channel dims (checked when the flood ends)."""
        if at is None:
            return
        if at[0] == "attr":
            self.edits.append(Edit("attr", str(op.node.target), (at[1],), width))
            return
        value = arg_at(op.node, at)
        if runtime and isinstance(value, Node):
            self.runtime.append((op.node, value, size_reads(value, self.ndim)))
        if isinstance(value, int) and not isinstance(value, bool) and value != -1:
            self.edits.append(Edit("arg", op.node.name, tuple(at), width))


def _value(op: Op, pos: int) -> Value | None:
    return op.node if pos == OUT else op.operands[pos]


def _norm_dim(d: Any, ndim: int) -> int:
    return d + ndim if isinstance(d, int) and d < 0 else d


def r_pointwise(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_expand(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    out = r_pointwise(op, pos, s, ctx)
    out_dim = s.dim if pos == OUT else next((d for v, d, *_ in out if v is op.node), None)
    if out_dim is not None and "sizes_at" in op.extra:
        ctx.edit(op, op.extra["sizes_at"](out_dim), s.width)
    return out


def r_attr(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    return [(op.operands[0], s.dim, s.offset, s.width)] if pos == OUT else [(op.node, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_linear(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_conv(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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
            raise Unmappable(
                op.node, f"a depthwise convolution with multiplier {m} ties {m} output channels to each input"
            )
        inner = [(w, 0, o, k), (b, 0, o, k), (op.node, ch, o, k), (x, ch, o // m, k // m)]
        ctx.edit(op, op.extra.get("groups_at"), k // m)
        return [c for c in inner if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]
    raise Unmappable(op.node, f"a grouped convolution (groups={groups}) ties channels in groups")


def r_batch_norm(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    x = op.operands[0]
    o, k = s.offset, s.width
    if pos in (0, OUT) and s.dim != 1:
        return [(op.node if pos == 0 else x, s.dim, o, k)]  # type: ignore[list-item]
    everything = [(x, 1, o, k), (op.node, 1, o, k)] + [(v, 0, o, k) for v in op.operands[1:]]
    return [c for c in everything if c[0] is not None and c[0] is not _value(op, pos)]  # type: ignore[misc]


def r_layer_norm(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    n = op.extra.get("normalized", 1)
    nd = ctx.ndim(op.node)
    if pos in (0, OUT) and s.dim < nd - n:
        return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]
    raise Unmappable(op.node, "LayerNorm normalises over the channel dim (its mean and variance would change)")


def r_group_norm(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    raise Unmappable(op.node, "GroupNorm normalises over groups of channels")


def r_softmax(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    if _norm_dim(op.extra.get("dim"), nd) == s.dim or op.extra.get("dim") is None:
        raise Unmappable(op.node, "softmax normalises over the channel dim")
    return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_reduce(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_pool(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    if s.dim >= nd - op.extra.get("spatial", 2):
        raise Unmappable(op.node, "pooling mixes values along this (spatial) dim")
    return [(op.node if pos == 0 else op.operands[0], s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_reshape(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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
        ctx.edit(op, op.extra["sizes_at"](out_dim), out_width, runtime=True)
    return [(other, d, o, k)]  # type: ignore[list-item]


def r_transpose(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_cat(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    nd = ctx.ndim(op.node)
    dim = _norm_dim(op.extra["dim"], nd)
    if s.dim != dim:
        return [
            (v, s.dim, s.offset, s.width) for v in [*op.operands, op.node] if v is not None and v is not _value(op, pos)
        ]
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


def r_split(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    x = op.operands[0]
    nd = ctx.ndim(x)
    dim = _norm_dim(op.extra["dim"], nd)
    pieces = [u for u in op.node.users if u.target is operator.getitem]
    if pos != 0:
        raise Unmappable(op.node, "split output used whole")
    if s.dim != dim:
        return [(u, s.dim, s.offset, s.width) for u in pieces]
    raise Unmappable(
        op.node,
        "split / chunk cuts the channel dim (a fused projection such as gate_up + chunk); "
        "its pieces could not stay equal",
    )


def r_getitem(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    source = op.operands[0]
    index = op.node.args[1]
    src_op = ctx.g.ops.get(source) if isinstance(source, Node) else None
    if src_op is not None and src_op.kind == "split":  # a piece of a split: only reached as a producer
        dim = _norm_dim(src_op.extra["dim"], ctx.ndim(op.node))
        if s.dim == dim:
            raise Unmappable(
                src_op.node,
                "split / chunk cuts the channel dim (a fused projection such as gate_up + "
                "chunk); its pieces could not stay equal",
            )
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
            full[di] = (
                i.step in (None, 1)
                and i.start in (None, 0)
                and (i.stop is None or (isinstance(i.stop, int) and i.stop >= sin[di]))
            )
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


def r_slice(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    x = op.operands[0]
    nd = ctx.ndim(x)
    dim = _norm_dim(op.extra["dim"], nd)
    if s.dim == dim:
        size = (ctx.g.shape(x) or ())[dim]
        start, end, step = op.extra["start"], op.extra["end"], op.extra["step"]
        if not (start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= size))):
            raise Unmappable(op.node, "a slice selects part of the channel dim")
    return [(op.node if pos == 0 else x, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_repeat_interleave(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    """``x.repeat_interleave(r, dim)``: unit ``c`` of ``x`` becomes units ``c·r .. c·r + r - 1`` of the output
    along ``dim`` (grouped-query attention's ``k.repeat_interleave(n_rep, dim=1)``: a kv head and its copies)."""
    x = op.operands[0]
    repeats, dim = op.extra["repeats"], op.extra["dim"]
    if dim is None:
        raise Unmappable(op.node, "repeat_interleave without a dim flattens the input")
    if not isinstance(repeats, int):
        raise Unmappable(op.node, "repeat_interleave with a tensor of repeats (one count per index)")
    dim = _norm_dim(dim, ctx.ndim(x))
    if s.dim != dim:
        return [(op.node if pos == 0 else x, s.dim, s.offset, s.width)]  # type: ignore[list-item]
    if pos == 0:
        ctx.edit(op, op.extra.get("output_size_at"), s.width * repeats)
        return [(op.node, dim, s.offset * repeats, s.width * repeats)]
    if s.offset % repeats or s.width % repeats:
        raise Unmappable(
            op.node,
            f"repeat_interleave repeats each index {repeats} times; a unit here covers {s.width}",
            repeats // math.gcd(s.width, repeats),
        )
    ctx.edit(op, op.extra.get("output_size_at"), s.width)
    return [(x, dim, s.offset // repeats, s.width // repeats)]  # type: ignore[list-item]


def r_select(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    nd = ctx.ndim(op.operands[0])
    dim = _norm_dim(op.extra["dim"], nd)
    if pos == 0:
        if s.dim == dim:
            raise Unmappable(op.node, "select picks one index of the channel dim")
        return [(op.node, s.dim - (s.dim > dim), s.offset, s.width)]
    return [(op.operands[0], s.dim + (s.dim >= dim), s.offset, s.width)]  # type: ignore[list-item]


def r_matmul(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_addmm(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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


def r_sdpa(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
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
                raise Unmappable(
                    op.node,
                    "the default scale 1/sqrt(head size) of scaled_dot_product_attention "
                    "would change with the head size",
                )
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


def r_embedding(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    idx, w = op.operands
    last = ctx.ndim(op.node) - 1
    if pos == 1:
        if s.dim == 0:
            raise Unmappable(op.node, "embedding rows are looked up by index")
        return [(op.node, last, s.offset, s.width)]
    if pos == OUT and s.dim == last:
        return [(w, 1, s.offset, s.width)]  # type: ignore[list-item]
    return [(op.node if pos == 0 else idx, s.dim, s.offset, s.width)]  # type: ignore[list-item]


def r_shape(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    return []  # reads the size only; a size read from a shrunk dim is read again at run time


def r_unknown(op: Op, pos: int, s: Slot, ctx: RuleContext) -> list[Coupling]:
    raise Unmappable(op.node, f"no channel rule for {op.extra.get('what', op.node.target)}")


Rule = Callable[[Op, int, Slot, RuleContext], list[Coupling]]
#: rule kind → how it maps a slot on one operand (or the output, position -1) to the coupled slots
RULES: dict[str, Rule] = {
    "attr": r_attr,
    "linear": r_linear,
    "conv": r_conv,
    "batch_norm": r_batch_norm,
    "layer_norm": r_layer_norm,
    "group_norm": r_group_norm,
    "pointwise": r_pointwise,
    "expand": r_expand,
    "softmax": r_softmax,
    "reduce": r_reduce,
    "pool": r_pool,
    "reshape": r_reshape,
    "transpose": r_transpose,
    "cat": r_cat,
    "split": r_split,
    "getitem": r_getitem,
    "slice": r_slice,
    "select": r_select,
    "matmul": r_matmul,
    "repeat_interleave": r_repeat_interleave,
    "sdpa": r_sdpa,
    "addmm": r_addmm,
    "embedding": r_embedding,
    "shape": r_shape,
    "unknown": r_unknown,
}


# --- the flood ---------------------------------------------------------------------------------------
class Flood:
    """All slots coupled to a seed slot; raises :class:`Unmappable` at the first slot it cannot map."""

    def __init__(self, graph: ChannelGraph, units: int) -> None:
        self.g = graph
        self.ctx = RuleContext(graph, units)
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
        for node, size, reads in self.ctx.runtime:  # a run-time size on the channel dim must read a shrinking dim
            if reads is None or not any(r in self.slots for r in reads):
                why = f"its size on the channel dim is {size.name!r}, computed at run time from a tensor this group"
                raise Unmappable(
                    node, f"{why} does not shrink; write -1 (or a constant) there so the shrunk model fits"
                )

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
