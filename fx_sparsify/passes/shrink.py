"""Pass: physically remove the pruned channels of a squashed module (``squash(shrink=True)``, SPEC §10).

Runs on the plain ``GraphModule`` squash returns, with the channel plan of ``state.channels``
(see :mod:`.channels`) and each removable group's keep vector:

1. every member tensor loses the pruned slices along its dim (parameters stay parameters, tied
   parameters stay one tensor, buffers such as BatchNorm running statistics shrink too);
2. the ints that equal a shrunk size are rewritten: graph constants (``view(B, T, 12, 64)`` → the new
   head count, a depthwise ``conv2d``'s ``groups``) and module attributes (``groups``);
3. module attributes that describe a tensor's size are refreshed from the new tensors by the table
   :data:`REFRESH` (``in_features``, ``out_channels``, ``num_features``, …).

Removing a channel is exact because the masks of a channels rule cover every coupled tensor, the
consumers' input columns included: whatever value a pruned channel carries (``sigmoid(0)``, a
BatchNorm's shift) is multiplied by a masked column, so it already contributes nothing in the masked
module. Channels that other rules left as zero weight rows (``ln_structured`` with ``dim=0``) carry their
bias through the coupled ops instead: the constant each one delivers to a consumer (see
:mod:`.channels.constants`) is first added to that consumer's bias, times its input columns, and only then
is the channel removed. The result's ``state_dict`` keeps the original keys, with smaller shapes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .._modules import find_tensor
from ..mha import HeadPrunedMultiheadAttention, as_head_pruned
from ..state import SparsityState
from ._runner import PassResult, finish
from .channels import CHANNELS, ChannelPlan, evaluate, fold_deltas, group_keeps
from .layer_index import LayerIndex
from .squash import activation_fold

__all__ = ["remove_channels", "channel_keeps", "REFRESH", "REFRESH_BY_NAME", "refresh_attributes"]


# each refresher takes a module of its table key's type (nn.Module's attribute types are a union)
def _conv(m: Any) -> None:
    w = m.weight
    m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _linear(m: Any) -> None:
    m.out_features, m.in_features = m.weight.shape


def _batch_norm(m: Any) -> None:
    source = m.weight if m.weight is not None else m.running_mean
    if source is not None:
        m.num_features = source.shape[0]


def _embedding(m: Any) -> None:
    m.embedding_dim = m.weight.shape[1]


#: module type → how to refresh its size attributes from its (shrunk) tensors
REFRESH: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.Embedding: _embedding,
    # heads removed: the attention computes with num_heads * head_dim < embed_dim (its out_proj has fewer inputs)
    nn.MultiheadAttention: as_head_pruned,
    HeadPrunedMultiheadAttention: as_head_pruned,
    nn.modules.linear.NonDynamicallyQuantizableLinear: _linear,
}


def _conv1d_hf(m: Any) -> None:  # transformers' Conv1D: weight (in, out), forward reads self.nf
    m.nf = m.weight.shape[1]


#: module class name → refresh, for third-party layers we do not import
REFRESH_BY_NAME: dict[str, Callable[[nn.Module], None]] = {"Conv1D": _conv1d_hf}


def refresh_attributes(root: nn.Module) -> None:
    """Refresh every module's size attributes from its tensors (:data:`REFRESH`, :data:`REFRESH_BY_NAME`)."""
    for module in root.modules():
        refresh = REFRESH.get(type(module)) or REFRESH_BY_NAME.get(type(module).__name__)
        if refresh is not None:
            refresh(module)


def _set_at(node: Node, path: tuple[Any, ...], change: Callable[[int], int]) -> None:
    def rebuild(container: Any, rest: tuple[Any, ...]) -> Any:
        if not rest:
            return change(container)
        key = rest[0]
        if isinstance(container, dict):
            copy = dict(container)
            copy[key] = rebuild(copy[key], rest[1:])
            return copy
        items = list(container)
        items[key] = rebuild(items[key], rest[1:])
        return type(container)(items) if isinstance(container, tuple) else items

    if path[0] == "args":
        node.args = rebuild(node.args, path[1:])
    else:
        node.kwargs = rebuild(node.kwargs, path[1:])


def _paths(gm: GraphModule, state: SparsityState, name: str) -> list[str]:
    """Every path under which tensor ``name`` (a canonical FQN) is reachable in ``gm``."""
    paths = [a for a, c in state.aliases.items() if c == name] or [name]
    return [p for p in paths if find_tensor(gm, p) is not None]


def _consumer_weights(gm: GraphModule, state: SparsityState, plan: ChannelPlan) -> dict[str, Tensor]:
    """Consumer columns of groups no channels rule owns, as squash will write them: weight × its mask ×
    the activation mask squash folds into its columns (SPEC §10: shrinking what other rules zeroed)."""
    wanted = {m.tensor: m.dim for g in plan.groups if g.rule is None and g.removable for m in g.members if m.consumer}
    if not wanted:
        return {}
    out: dict[str, Tensor] = {}
    index = LayerIndex(gm, state.aliases)
    with torch.no_grad():
        for name, dim in wanted.items():
            weight = find_tensor(gm, name)
            if weight is None:
                continue
            w = weight.detach()
            record = state.targets.get(name)
            if record is not None and record.kind != "activation":
                w = w * (gm.get_buffer(record.buffer) != 0).to(w.dtype)
            for r in state.targets.values():
                layer_weight = f"{r.layer}.weight" if r.layer else "weight"
                if r.kind == "activation" and state.aliases.get(layer_weight, layer_weight) == name:
                    vector = activation_fold(gm, state, r, index)
                    if vector is not None and (vector.numel() == w.shape[dim] or vector.numel() == 1):
                        shape = [1] * w.dim()
                        shape[dim] = -1
                        w = w * vector.to(w.dtype).reshape(shape)
            out[name] = w
    return out


def _as_squashed(gm: GraphModule, state: SparsityState, consumers: Mapping[str, Tensor]) -> Callable[[str], Tensor]:
    """Tensor by name as squash will write it: weight-rule masks applied, activation masks in the columns."""

    def get(name: str) -> Tensor:
        if name in consumers:
            return consumers[name]
        canonical = state.aliases.get(name, name)
        tensor = find_tensor(gm, name)
        assert tensor is not None, f"{name} is not in the sparse module"
        record = state.targets.get(canonical)
        if record is not None and record.kind != "activation" and record.buffer is not None:
            return tensor.detach() * (gm.get_buffer(record.buffer) != 0).to(tensor.dtype)
        return tensor.detach()

    return get


def channel_keeps(gm: GraphModule, state: SparsityState, notes: dict[int, str] | None = None) -> dict[int, Tensor]:
    """Group id → keep vector: from the channels rules' masks, for other groups from zero consumer columns and
    from zero weight rows whose constant folds into the consumers' biases (``notes``: group id → why some
    zero-row channels stay, filled when given)."""
    plan = state.channels
    if plan is None:
        return {}
    masks = {n: gm.get_buffer(r.buffer) for n, r in state.targets.items() if r.method == CHANNELS}
    consumers = _consumer_weights(gm, state, plan)
    keeps = group_keeps(plan, masks, consumers)
    get = _as_squashed(gm, state, consumers)
    for group in plan.groups:
        if group.constants is None or not group.removable or group.id not in keeps:
            continue
        found = evaluate(gm, group.units, group.constants, get)
        keep = keeps[group.id] & ~found.removable
        keeps[group.id] = keep if bool(keep.any()) else _first(keep)
        if notes is not None and found.why:
            first = next(iter(found.why.values()))
            notes[group.id] = f"{len(found.why)} zero-row channel(s) kept: {first}"
    return keeps


def _first(keep: Tensor) -> Tensor:
    """Keep at least one unit of a group (a layer with no channel left is not a layer)."""
    one = torch.zeros_like(keep)
    one[0] = True
    return one


def _replace(gm: GraphModule, paths: list[str], old: Tensor, new: Tensor) -> None:
    """Put ``new`` at every path of a shared tensor, in place of ``old`` (as a parameter with ``old``'s
    ``requires_grad`` when ``old`` is one, else as a buffer)."""
    value: Tensor = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    for path in paths:
        owner, _, leaf = path.rpartition(".")
        module = gm.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = value  # type: ignore[assignment]
        else:
            module._buffers[leaf] = value


def _fold_constants(gm: GraphModule, state: SparsityState, plan: ChannelPlan, keeps: Mapping[int, Tensor]) -> None:
    """Add the constants of the zero-row channels about to go into their consumers' biases (new tensors:
    ``gm`` shares its tensors with the sparse module)."""
    get = lambda name: find_tensor(gm, name)  # noqa: E731  (the squashed module: tensors as squash wrote them)
    deltas: dict[str, Tensor] = {}
    for group in plan.groups:
        keep = keeps.get(group.id)
        if group.constants is None or not group.removable or keep is None or bool(keep.all()):
            continue
        found = evaluate(gm, group.units, group.constants, get)  # type: ignore[arg-type]
        for name, delta in fold_deltas(get, group.units, group.constants, found, ~keep).items():  # type: ignore[arg-type]
            deltas[name] = deltas[name] + delta if name in deltas else delta
    with torch.no_grad():
        for name, delta in deltas.items():
            paths = _paths(gm, state, name)
            old = find_tensor(gm, paths[0])
            assert old is not None
            _replace(gm, paths, old, (old.detach().double() + delta.to(old.device)).to(old.dtype))


def remove_channels(gm: GraphModule, state: SparsityState, keeps: Mapping[int, Tensor]) -> PassResult:
    """Remove from ``gm`` (a squashed module) the units that ``keeps`` (group id → keep vector) prunes."""
    plan = state.channels
    assert plan is not None, "remove_channels runs only for a spec with channel groups"
    _fold_constants(gm, state, plan, keeps)
    removed: dict[str, dict[int, set[int]]] = {}
    deltas: dict[tuple[str, str, tuple[Any, ...]], int] = {}
    done: dict[str, dict[str, str]] = {}
    for group in plan.groups:
        keep = keeps.get(group.id)
        if not group.removable or keep is None:
            continue
        pruned = (~keep).nonzero().flatten().tolist()
        if not pruned:
            continue
        for m in group.members:
            removed.setdefault(m.tensor, {}).setdefault(m.dim, set()).update(m.indices(pruned))
        for e in group.edits:
            key = (e.kind, e.where, e.path)
            deltas[key] = deltas.get(key, 0) + len(pruned) * e.width
        done[f"group {group.id}"] = {"kept": str(int(keep.sum())), "of": str(group.units)}
    with torch.no_grad():
        for name, dims in removed.items():
            paths = _paths(gm, state, name)
            assert paths, f"member {name} of a channel group is not in the squashed module"
            old = find_tensor(gm, paths[0])
            assert old is not None
            new = old.detach()
            for d, idx in sorted(dims.items()):
                kept = torch.tensor(
                    [i for i in range(new.shape[d]) if i not in idx], dtype=torch.long, device=new.device
                )
                new = new.index_select(d, kept)
            _replace(gm, paths, old, new.contiguous())
    nodes = {n.name: n for n in gm.graph.nodes}
    for (kind, where, path), delta in deltas.items():
        if kind == "attr":
            module = gm.get_submodule(where)
            setattr(module, path[0], getattr(module, path[0]) - delta)
        else:
            assert where in nodes, f"node {where} of a channel edit is not in the squashed graph"
            _set_at(nodes[where], path, lambda v, delta=delta: v - delta)  # type: ignore[misc]  # bound now
    refresh_attributes(gm)
    gm.recompile()
    return finish(gm, done)
