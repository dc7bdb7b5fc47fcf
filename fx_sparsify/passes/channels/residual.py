"""The residual stream a consumer writes into, for sequential ``channels`` refits (SPEC §17).

In a residual network a consumer's output is added to the stream it was computed from: an attention
block's output projection in ``x + o(attn(x))``, an MLP's down projection in ``x + down(act(up(x)))``.
With ``"sequential": true`` the groups before a consumer are already pruned when it is refit, so the
stream ``r'`` its output is added to on the replayed calibration inputs differs from the stream ``r`` of
the calibration forwards. The refit then aims at the *sum* the calibration forwards gave the add: the
consumer's new output on its replayed inputs ``x'`` is fitted to ``W·x + b + (r − r')``, so besides
reproducing its own outputs it repairs, as far as a linear function of ``x'`` can, the error the earlier
groups left in the stream (the add's result is what the rest of the model reads).

:func:`residual_operand` finds the add: the consumer's output (through dropout, ``Identity`` and reshapes
that keep its rows) is one operand of an add (``operator.add``, ``torch.add``, ``aten.add.Tensor``; no
``alpha``) whose other operand does not depend on the consumer. A
:class:`ResidualRowsObserver` on that operand keeps its calibration rows; during the consumer's paired
replay it turns them into the differences ``r − r'``, which the consumer's observer folds into
``Σ [x', 1]ᵀ·(r − r')`` (``residual_cross``). A consumer read through unfolded patches (a ``Conv2d``), an
add of a broadcast operand, or one whose other operand runs after the consumer's input in the graph gets
no residual target (its refit aims at its own calibration outputs, as before).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..._meta import NodeInfo, annotate
from ..._names import unique_attr
from ...hessian import SUM_DTYPE, add_product
from ...observer import ActivationObserver
from ..layer_index import ancestors

__all__ = ["ResidualRowsObserver", "residual_operand", "insert_residual_observer", "pair_residual"]

_ADDS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor)
_DROPOUTS = (F.dropout, torch.dropout, torch.ops.aten.dropout.default)
# row-preserving reshapes the output may pass through (GPT-2's addmm rows viewed as (b, t, out)); the width
# is checked when the statistics are read (a reshape of the last dim pairs rows of another width: no target)
_RESHAPES = (
    torch.reshape,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
)


class ResidualRowsObserver(ActivationObserver):
    """Identity on the other operand of a consumer's residual add; keeps its calibration rows ``r`` (float32).

    While :func:`~.importance.paired_replay` runs (``replay_at`` set), the ``k``-th replayed batch ``r'``
    gives ``diffs[k] = r_k − r'_k``, for the consumer's observer to pair with its replayed inputs (the
    differences go when the replay ends; the kept rows when the step ends).
    """

    def __init__(self) -> None:
        super().__init__("sum", "sum")
        self.keep = True
        self.kept: list[Tensor] = []
        self.diffs: list[Tensor | None] = []
        self.replay_at: int | None = None

    def _observe(self, x: Tensor) -> None:
        attrs = self.__dict__
        attrs["input_shape"] = x.shape
        rows = x.detach().reshape(-1, x.shape[-1] if x.dim() else 1).to(torch.float32)
        if self.replay_at is not None:
            at = self.replay_at
            same = at < len(self.kept) and self.kept[at].shape == rows.shape
            self.diffs.append(self.kept[at] - rows if same else None)
            attrs["replay_at"] = at + 1
        elif self.keep:
            self.kept.append(rows.clone())
        attrs["samples"] += rows.shape[0]
        attrs["batches"] += 1

    def difference(self, at: int, rows: int) -> Tensor | None:
        """``r − r'`` of the ``at``-th replayed batch, if that batch has been replayed here and has ``rows`` rows."""
        diff = self.diffs[at] if at < len(self.diffs) else None
        return diff if diff is not None and diff.shape[0] == rows else None

    def clear_kept(self) -> None:
        self.kept, self.diffs, self.replay_at = [], [], None

    def extra_repr(self) -> str:
        return f"kept={len(self.kept)}"


def _passes_through(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (nn.Dropout, nn.Identity))
    if node.op == "call_method":
        return node.target in ("view", "reshape")
    return node.op == "call_function" and (node.target in _DROPOUTS or node.target in _RESHAPES)


def residual_operand(gm: GraphModule, call: Node) -> tuple[Node, Node] | None:
    """(add node, other operand) when ``call``'s output, through dropout, ``Identity`` and reshapes, is one
    operand of an add whose other operand is a node that does not depend on ``call``; None otherwise."""
    node = call
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _passes_through(gm, user) and user.args and user.args[0] is node:
            node = user
            continue
        if user.op != "call_function" or user.target not in _ADDS or user.kwargs or len(user.args) != 2:
            return None
        a, b = user.args
        other = b if a is node else a if b is node else None
        if not isinstance(other, Node) or other is node or call in ancestors(other) or other is call:
            return None
        return user, other
    return None


def insert_residual_observer(gm: GraphModule, layer: str, call: Node) -> str | None:
    """A :class:`ResidualRowsObserver` on the residual operand of ``call`` (``layer``'s call); its name, or None."""
    found = residual_operand(gm, call)
    if found is None:
        return None
    add, other = found
    graph = gm.graph
    name = unique_attr(gm, f"{layer.replace('.', '_')}_residual_observer")
    observer = ResidualRowsObserver()
    gm.add_module(name, observer)
    observer.name = name
    observer.layer = layer
    if other.op == "placeholder":  # after the last input
        after = [n for n in graph.nodes if n.op == "placeholder"][-1]
    else:
        after = other
    with graph.inserting_after(after):  # it runs as soon as the stream is known: before the consumer's input
        node = graph.create_node("call_module", name, (other,), {}, name=name)
    annotate(node, NodeInfo("observer", target=f"{layer}:residual", module=layer))
    add.replace_input_with(other, node)
    return name


def pair_residual(observer: Any, rows: Tensor) -> None:
    """Fold ``Σ [x', 1]ᵀ·(r − r')`` of the replayed batch ``observer.replay_at`` into ``observer.residual_cross``
    (``rows``: the consumer's replayed input rows); a batch whose difference is not ready breaks the pairing."""
    partner = observer.__dict__.get("partner")
    if partner is None or observer.__dict__.get("residual_broken"):
        return
    diff = partner.difference(observer.replay_at, rows.shape[0])
    if diff is None:
        observer.__dict__["residual_broken"] = True
        return
    if observer.residual_cross is None:
        observer.residual_cross = diff.new_zeros(rows.shape[1], diff.shape[1], dtype=SUM_DTYPE)
    add_product(observer.residual_cross, rows, diff.to(rows.dtype))
