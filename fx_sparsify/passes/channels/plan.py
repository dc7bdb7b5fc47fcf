"""Planning: the channel groups seeded by a spec's ``channels`` rules and by other rules' structured zeros.

A *group* is a set of channel slices that must go together: pruning output channel ``c`` of a layer
also removes row ``c`` of its bias, element ``c`` of the BatchNorm that follows, column ``c`` of every
consumer, channel ``c`` of the other operands of a residual ``add``, and so on. :func:`plan_channels`
floods the graph (:mod:`.rules`) from each selected layer's weight rows; a group whose flood reaches
something the rules cannot map is kept, non-removable, with the node and the reason recorded.

    >>> plan = plan_channels(gm, spec, model, aliases, example_inputs=(x,))  # doctest: +SKIP
    >>> plan.groups[0].members[:3]                                          # doctest: +SKIP
    [Member('conv1.weight', dim=0), Member('conv1.bias', dim=0), Member('bn1.weight', dim=0)]

Groups no ``channels`` rule owns (``rule`` None) are planned for the layers whose input columns other
rules may zero (activation rules, ``ln_structured`` / ``random_structured`` with ``dim=1``): *passive
column* groups. Layers whose output rows a structured rule may zero (``dim=0``) get a *zero-row* group
with a constant program (:mod:`.constants`): where the pruned channels' constants fold. Neither gets a
mask; ``squash(shrink=True)`` removes the units that squash writes as zero.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn
from torch.fx import GraphModule, Node

from ...mha import MHA_CALL
from ...select import WeightTarget, select, select_layers
from ...spec import ChannelRule, SparsitySpec
from .constants import ConstProgram, build_program
from .graph import ChannelGraph, Edit, Member, Unmappable, is_layer_weight, record_shapes, weight_dim
from .rules import Flood

__all__ = ["CHANNELS", "ChannelGroup", "ChannelPlan", "plan_channels", "passive_rules", "heads_attention"]

_log = logging.getLogger(__name__)

#: the ``method`` name of every mask a channels rule owns (TargetRecord.method)
CHANNELS = "channels"


@dataclass
class ChannelGroup:
    id: int
    units: int
    # "channel" | "head" (the forward's view shapes hold the head count) | "attention head" (an
    # nn.MultiheadAttention's num_heads holds it, which the shrink updates)
    unit: str
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
    # consumer layer -> the observer of its input statistics (rules with a calibrated importance or reconstruct)
    observers: dict[str, str] = field(default_factory=dict)
    # consumer weights the last step refit without a bias (the removed channels' mean could not be folded)
    unbiased: set[str] = field(default_factory=set)

    def targets(self) -> dict[str, WeightTarget]:
        """Parameter FQN → a target for the mask it needs (members of removable groups)."""
        out: dict[str, WeightTarget] = {}
        for g in self.groups:
            if g.removable and g.rule is not None:
                for m in g.members:
                    if m.is_param:
                        out.setdefault(m.tensor, WeightTarget(m.tensor, self.rules[g.rule]))
        return out


class _Planner:
    """Adds groups to a plan: one flood per seed, unless a group already holds the seed's slot."""

    def __init__(self, gm: GraphModule, graph: ChannelGraph) -> None:
        self.graph = graph
        self.groups: list[ChannelGroup] = []
        self.owner: dict[tuple[str, int], ChannelGroup] = {}  # (tensor, dim) → the group holding it
        self.order = {name: i for i, name in enumerate(gm.state_dict(keep_vars=True))}  # members in model order

    def add_group(
        self,
        root: str,
        width: int,
        unit: str,
        rule: int | None,
        allow_coarsen: bool,
        dim: int | None = None,
        rows: bool = False,
    ) -> ChannelGroup | None:
        graph, groups, owner, order = self.graph, self.groups, self.owner, self.order
        shape = graph.shape(root)
        assert shape is not None
        dim = weight_dim(graph, root) if dim is None else dim
        assert dim is not None
        existing = owner.get((root, dim))
        if existing is not None:
            if rule is not None:
                existing.rule = rule
            if rows and existing.removable and existing.rule is None and existing.constants is None:
                again = Flood(graph, existing.units)  # a columns group that zero rows may shrink too
                again.run(existing.roots[0], next(m.dim for m in existing.members if m.tensor == existing.roots[0]), 1)
                existing.constants = _program(graph, again, root)
            return existing
        w = width
        while True:
            flood = Flood(graph, shape[dim] // w)
            try:
                flood.run(root, dim, w)
                err = None
                break
            except Unmappable as exc:
                if allow_coarsen and exc.split and shape[dim] % (w * exc.split) == 0:
                    w *= exc.split
                    continue
                err = exc
                break
        if unit == "head" and w == width:
            return None  # no reshape into heads downstream: not a head projection
        members = sorted(
            (
                dataclasses.replace(m, consumer=m.is_param and weight_dim(graph, m.tensor, columns=True) == m.dim)
                for m in flood.members
            ),
            key=lambda m: (order.get(m.tensor, len(order)), m.dim),
        )
        group = ChannelGroup(len(groups), shape[dim] // w, unit, [root], members, flood.ctx.edits, rule)
        group.edits = list(dict.fromkeys(group.edits))
        if err is not None and rule is None and not rows:
            return None  # a group only other rules' zeros could shrink, and it cannot: nothing to say
        if err is None and rows and rule is None:
            group.constants = _program(graph, flood, root)
        if err is not None:
            group.removable = False
            group.node = err.node.format_node() if err.node is not None else None
            group.reason = err.reason + (
                "; prune whole heads with a 'heads' rule" if err.split and unit == "channel" else ""
            )
            group.edits = []
        for m in group.members:
            owner.setdefault((m.tensor, m.dim), group)
            if m.tensor != root and m.is_param and weight_dim(graph, m.tensor) == m.dim:
                group.roots.append(m.tensor)
        groups.append(group)
        return group

    def add_attention(self, path: str, module: nn.MultiheadAttention, rule: int) -> ChannelGroup:
        """The heads of an ``nn.MultiheadAttention`` as one group, from its parameters: the q, k and v rows of
        each head (packed ``in_proj_weight`` / ``in_proj_bias`` or separate projections), ``bias_k`` /
        ``bias_v`` and the ``out_proj`` columns. Its input and output keep ``embed_dim``."""
        canonical = self.graph.canonical
        hd, embed = module.head_dim, module.embed_dim
        if module.in_proj_weight is not None:
            members = [Member(canonical(f"{path}.in_proj_weight"), 0, i * embed, hd) for i in range(3)]
        else:
            members = [Member(canonical(f"{path}.{p}_proj_weight"), 0, 0, hd) for p in "qkv"]
        if module.in_proj_bias is not None:
            members += [Member(canonical(f"{path}.in_proj_bias"), 0, i * embed, hd) for i in range(3)]
        if module.bias_k is not None and module.bias_v is not None:
            members += [Member(canonical(f"{path}.bias_k"), 2, 0, hd), Member(canonical(f"{path}.bias_v"), 2, 0, hd)]
        members.append(Member(canonical(f"{path}.out_proj.weight"), 1, 0, hd, consumer=True))
        existing = self.owner.get((members[0].tensor, 0))
        if existing is not None:
            existing.rule = rule
            return existing
        group = ChannelGroup(
            len(self.groups), module.num_heads, "attention head", [members[0].tensor], members, [], rule
        )
        for m in members:
            self.owner.setdefault((m.tensor, m.dim), group)
        self.groups.append(group)
        return group


def _attention_calls(gm: GraphModule) -> set[str]:
    """Paths of the attentions the graph calls whole: a ``call_module`` node (fx capture keeps torch.nn
    modules as leaves), or one op :data:`~fx_sparsify.mha.MHA_CALL` (an export capture under ``attention_as_op``)
    whose ``in_proj_weight`` / ``q_proj_weight`` operand names the module."""
    out = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for n in gm.graph.nodes:
        if MHA_CALL is not None and n.op == "call_function" and n.target is MHA_CALL:
            weight = n.args[3] if isinstance(n.args[3], Node) else n.args[13]
            if isinstance(weight, Node) and weight.op == "get_attr":
                out.add(str(weight.target).rpartition(".")[0])
    return out


def heads_attention(spec: SparsitySpec, model: nn.Module) -> list[nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` modules inside the modules that ``heads`` rules select (capture them whole)."""
    found: list[nn.MultiheadAttention] = []
    for i, rule in enumerate(spec.channels):
        if rule.heads is None:
            continue
        for layer in select_layers(rule.target, model, f"spec['channels'][{i}] ({rule.target!r})"):
            for sub in model.get_submodule(layer).modules():
                if isinstance(sub, nn.MultiheadAttention) and sub not in found:
                    found.append(sub)
    return found


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
    graph = ChannelGraph(gm, aliases, shapes)
    planner = _Planner(gm, graph)
    add_group = planner.add_group

    for i, rule in enumerate(spec.channels):
        where = f"spec['channels'][{i}] ({rule.target!r})"
        if rule.heads is None:
            roots = select(rule.target, model, dict(aliases), where)
            for root in roots:
                if not is_layer_weight(graph, root):
                    raise ValueError(
                        f"{where}: {root!r} is not the weight of a Linear, Conv or Conv1D (addmm) layer "
                        "in the captured "
                        "graph; a channels rule prunes the output channels of such layers"
                    )
                add_group(root, 1, "channel", i, allow_coarsen=False)
        else:
            found = []
            selected = select_layers(rule.target, model, where)
            called, attentions = _attention_calls(gm), []
            for module in selected:
                for sub_name, sub in model.get_submodule(module).named_modules():
                    path = f"{module}.{sub_name}".strip(".")
                    whole = path in called or any(path.startswith(f"{c}.") for c in called)  # or in a leaf
                    if isinstance(sub, nn.MultiheadAttention) and whole:
                        heads = planner.add_attention(path, sub, i)
                        attentions.append(sub)
                        if heads not in found:
                            found.append(heads)
                prefix = f"{module}."
                for name in list(dict.fromkeys(aliases.values())):
                    if name.startswith(prefix) and is_layer_weight(graph, name, ("linear", "addmm")):
                        group = add_group(name, 1, "head", i, allow_coarsen=True)
                        if group is not None and group not in found:
                            found.append(group)
            if not found:
                packed = [
                    f"{m}.{n}".strip(".")
                    for m in selected
                    for n, sub in model.get_submodule(m).named_modules()
                    if isinstance(sub, nn.MultiheadAttention) and sub not in attentions
                ]
                raise ValueError(
                    f"{where}: no attention heads found: a heads rule needs Linear projections inside the selected "
                    "module(s) whose outputs are reshaped into (heads, head_dim)"
                    + (
                        f"; {packed[0]!r} is an nn.MultiheadAttention that the captured graph does not call whole "
                        "(traced into ops whose (T, B*H, D) views fold heads into the batch dim): capture with "
                        "capture='fx' (it stays one module call), or with a torch that has torch.library.custom_op"
                        if packed
                        else ""
                    )
                )
            for group in found:
                _heads_per_unit(graph, group)
    for weight, in_dim in _passive_seeds(spec, model, aliases, graph):
        add_group(weight, 1, "channel", None, allow_coarsen=False, dim=in_dim)
    for weight, out_dim in _row_seeds(spec, model, aliases, graph):  # zero rows: their constants fold (item 5)
        add_group(weight, 1, "channel", None, allow_coarsen=False, dim=out_dim, rows=True)
    plan = ChannelPlan(planner.groups, spec.channels)
    _check_rules(plan)
    return plan


def passive_rules(spec: SparsitySpec) -> bool:
    """Whether rules other than ``channels`` may zero whole input channels of a layer (SPEC §10, item 5)."""
    return bool(spec.activations) or any(_column_rule(r) or _row_rule(r) for r in spec.weights)


def _column_rule(rule: Any) -> bool:
    return rule.method in ("ln_structured", "random_structured") and rule.options.get("dim", 0) in (1, -1)


def _program(graph: ChannelGraph, flood: Flood, root: str) -> ConstProgram | None:
    """The constant program of a zero-rows group; an optional analysis, so a failure only means no shrink."""
    try:
        return build_program(graph, flood)
    except Exception as exc:  # noqa: BLE001  (the weight rule works without it; say so in the log)
        _log.warning(
            "zero rows of %s will not shrink: the constant analysis failed (%s: %s)", root, type(exc).__name__, exc
        )
        return None


def _row_rule(rule: Any) -> bool:
    return rule.method in ("ln_structured", "random_structured")


def _row_seeds(
    spec: SparsitySpec, model: nn.Module, aliases: Mapping[str, str], graph: ChannelGraph
) -> list[tuple[str, int]]:
    """Layer weights whose whole output rows a structured weight rule may zero (its ``dim`` is the output dim)."""
    out: list[tuple[str, int]] = []
    for i, wrule in enumerate(spec.weights):
        if not _row_rule(wrule):
            continue
        for name in select(wrule.target, model, dict(aliases), f"spec['weights'][{i}]"):
            shape, out_dim = graph.shape(name), weight_dim(graph, name)
            if shape is None or out_dim is None:
                continue
            dim = wrule.options.get("dim", 0)
            if isinstance(dim, int) and dim % len(shape) == out_dim and (name, out_dim) not in out:
                out.append((name, out_dim))
    return out


def _passive_seeds(
    spec: SparsitySpec, model: nn.Module, aliases: Mapping[str, str], graph: ChannelGraph
) -> list[tuple[str, int]]:
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
        in_dim = weight_dim(graph, name, columns=True)
        shape = graph.shape(name)
        if in_dim is not None and shape is not None:
            out.append((name, in_dim))
    return out


def _heads_per_unit(graph: ChannelGraph, group: ChannelGroup) -> None:
    """Query heads per unit: the widest root's rows per unit over the narrowest (a kv head's own width)."""
    widths = [m.width for m in group.members if m.tensor in group.roots and m.dim == weight_dim(graph, m.tensor)]
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
