"""Masks of the channel groups: a score per unit, how many units stay, the keep-masks, and the report tables.

Every parameter member of a removable group owned by a ``channels`` rule gets a mask
(:func:`channel_masks`), the consumers' input columns included, so the masked module computes exactly what
the shrunk one will (a pruned channel's value after a non-zero-preserving op, e.g. ``sigmoid(0)``, never
reaches a kept output: the consumer's column is masked). Parameters not in any group keep their plain uses.

Scoring is one function per group (:data:`GroupScore`): it returns one score per unit (higher is kept);
:func:`magnitude_scores` (the Lp norm over the group's parameter slices) is the default, and
:func:`channel_masks` takes another as ``score``. :func:`group_keeps` reads the keep vectors back from
the masks (or, for groups no ``channels`` rule owns, from the zero consumer columns squash will write).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.fx import GraphModule

from ...schedule import scheduled_sparsity
from ...spec import ChannelRule
from .graph import ChannelGraph, Member
from .plan import ChannelGroup, ChannelPlan

__all__ = [
    "GroupScore",
    "unit_view",
    "magnitude_scores",
    "kept_units",
    "channel_masks",
    "group_keeps",
    "shrunk_sizes",
    "shrink_summary",
    "shrink_plan_table",
]

#: one score per unit of a group, higher is kept: (module, group, current masks by parameter FQN, rule) → (units,)
GroupScore = Callable[[GraphModule, ChannelGroup, Mapping[str, Tensor], ChannelRule], Tensor]


def unit_view(t: Tensor, m: Member, units: int) -> Tensor:
    """``t`` restricted to the member's slice, as ``(units, rest)``."""
    moved = t.movedim(m.dim, 0)[m.offset : m.offset + units * m.width]
    return moved.reshape(units, -1)


def magnitude_scores(gm: GraphModule, group: ChannelGroup, masks: Mapping[str, Tensor], rule: ChannelRule) -> Tensor:
    """The ``rule.p``-norm of each unit's slices across the group's float parameters (masked entries as 0)."""
    p = float(rule.p)
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
        norms = torch.linalg.vector_norm(unit_view(t, m, group.units).float(), ord=p, dim=1).double().cpu()
        if math.isinf(p):
            total = torch.maximum(total, norms)
        else:
            total += norms**p
    return total if math.isinf(p) else total ** (1.0 / p)


def _amount(rule: ChannelRule, steps: int) -> float | int:
    base = rule.sparsity if rule.heads is None else rule.heads
    if rule.schedule is not None:
        return scheduled_sparsity(rule.schedule, float(base or 0.0), steps)
    return base  # type: ignore[return-value]


def _kept_count(
    rule: ChannelRule, group: ChannelGroup, amount: float | int, where: str, fractional: bool | None = None
) -> int:
    """How many units of ``group`` stay: ``amount`` pruned (a fraction or a count), rounded and bounded."""
    n = group.units
    fractional = isinstance(amount, float) if fractional is None else fractional
    if rule.heads is not None:
        heads = n * group.heads_per_unit
        pruned_heads = round(amount * heads) if isinstance(amount, float) else int(amount)
        if pruned_heads % group.heads_per_unit:
            raise ValueError(
                f"{where}: {pruned_heads} of {heads} query heads requested in group {group.id}, "
                "but under grouped-query "
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


def kept_units(rule: ChannelRule, group: ChannelGroup, steps: int) -> int | None:
    """How many units of ``group`` a rule that is not ``global`` keeps at ``steps`` (None for a global rule:
    that depends on the other groups)."""
    if rule.global_ and rule.heads is None:
        return None
    return _kept_count(rule, group, _amount(rule, steps), f"channels rule {rule.target!r}")


def channel_masks(
    gm: GraphModule, plan: ChannelPlan, masks: Mapping[str, Tensor], steps: int, score: GroupScore = magnitude_scores
) -> dict[str, Tensor]:
    """Parameter FQN → new keep-mask for every member of a removable group (``masks``: the current ones;
    ``score``: one score per unit of a group, the lowest pruned)."""
    keeps: dict[int, Tensor] = {}
    for i, rule in enumerate(plan.rules):
        where = f"spec['channels'][{i}] ({rule.target!r})"
        mine = [g for g in plan.groups if g.rule == i and g.removable]
        if not mine:
            continue
        amount = _amount(rule, steps)
        scores = {g.id: score(gm, g, masks, rule) for g in mine}
        if rule.global_ and rule.heads is None and len(mine) > 1:
            keeps.update(_global_keeps(rule, mine, scores, amount, where))
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


def _global_keeps(
    rule: ChannelRule, groups: list[ChannelGroup], scores: Mapping[int, Tensor], amount: float | int, where: str
) -> dict[int, Tensor]:
    """Keep vectors of a ``global`` rule: ``amount`` of all the groups' units pruned where they score lowest.

    Scores are compared across groups as they are for ``"obs"`` (output errors, one scale) and divided by
    their group's mean otherwise (a norm or a fluctuation depends on the layer's scale: raw, the whole
    budget would fall on one layer). Each group gives up whole chunks, so what it keeps stays a multiple
    of its ``round_to`` and at least ``min_channels``: the chunks are taken cheapest first (a chunk costs
    its highest score) until the requested total is reached; one that would pass it closes its group.
    The total is exact when ``round_to`` is 1, else the largest one the chunks allow below it.
    """
    total = sum(g.units for g in groups)
    n_prune = round(amount * total) if isinstance(amount, float) else int(amount)
    if n_prune > total:
        raise ValueError(f"{where}: asks to prune {n_prune} channels of {total}")
    chunks: list[tuple[float, int, int, int]] = []  # (cost, group position, chunk index, size)
    order: dict[int, Tensor] = {}
    for i, g in enumerate(groups):
        s = scores[g.id].double()
        if rule.importance != "obs":
            mean = float(s.abs().mean())
            s = s / mean if mean > 0 else s
        order[g.id] = torch.argsort(s, stable=True)
        ranked = s[order[g.id]]
        round_to = (
            rule.round_to if rule.round_to is not None else (8 if isinstance(amount, float) and g.units > 32 else 1)
        )
        floor = max(rule.min_channels, round_to if g.units >= round_to else 1)
        at, j = 0, 0
        first = g.units % round_to  # then whole round_to chunks: what stays is a multiple of round_to
        while g.units - at > floor:
            size = min(first if j == 0 and first else round_to, g.units - at - floor)
            chunks.append((float(ranked[at + size - 1]), i, j, size))
            at, j = at + size, j + 1
    chunks.sort()
    pruned = [0] * len(groups)
    closed: set[int] = set()
    left = n_prune
    for _, i, _, size in chunks:
        if i in closed:
            continue
        if size > left:
            closed.add(i)
            continue
        pruned[i] += size
        left -= size
    out = {}
    for i, g in enumerate(groups):
        keep = torch.ones(g.units, dtype=torch.bool)
        keep[order[g.id][: pruned[i]]] = False
        out[g.id] = keep
    return out


def _keep_lowest(scores: Tensor, kept: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
    return keep


def group_keeps(
    plan: ChannelPlan, masks: Mapping[str, Tensor], consumers: Mapping[str, Tensor] | None = None
) -> dict[int, Tensor]:
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
                    keep |= unit_view(consumers[m.tensor].detach().cpu() != 0, m, g.units).any(dim=1)
            out[g.id] = keep if found and bool(keep.any()) else torch.ones(g.units, dtype=torch.bool)
            continue
        keep = torch.zeros(g.units, dtype=torch.bool)
        seen = False
        for m in g.members:
            mask = masks.get(m.tensor)
            if mask is None or not m.is_param:
                continue
            seen = True
            keep |= unit_view(mask.cpu() != 0, m, g.units).any(dim=1)
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
        shape = list(ChannelGraph.tensor_shape(gm, name) or ())
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
    return (
        f"channels: {len(plan.groups)} groups, {removable} removable; squash(shrink=True) keeps {after:,} of "
        f"{before:,} parameters ({after / max(before, 1):.1%}); see sgm.shrink_plan()"
    )


def shrink_plan_table(plan: ChannelPlan, keeps: Mapping[int, Tensor], notes: Mapping[int, str] | None = None) -> str:
    """The ``sgm.shrink_plan()`` table: one row per group (``notes``: why some channels of a removable group stay)."""
    from tabulate import tabulate

    rows = []
    for g in plan.groups:
        names = g.member_names()
        members = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
        kept = int(keeps[g.id].sum()) if g.id in keeps else g.units
        rule = f"channels[{g.rule}]" if g.rule is not None else "other rules' zeros"
        rows.append(
            [
                g.id,
                rule,
                g.unit_text(),
                members,
                f"{g.units} → {kept}",
                "yes" if g.removable else "no",
                g.node or "",
                g.reason or (notes or {}).get(g.id, ""),
            ]
        )
    removable = sum(1 for g in plan.groups if g.removable)
    head = f"fx_sparsify shrink plan: {len(plan.groups)} channel groups, {removable} removable"
    return (
        head
        + "\n"
        + tabulate(
            rows,
            headers=["group", "from", "unit", "members", "before → after", "removable", "node", "reason"],
            tablefmt="github",
        )
    )
