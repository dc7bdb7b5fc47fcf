"""Calibrated channel importance and the consumer refit of ``channels`` rules (SPEC §17), in the graph.

A removable group's *consumers* are the layers that read its units as input columns (its members with
``consumer=True``): the ``Linear`` after an MLP's up projection, the output projection of an attention
block, the next ``Conv2d``. For every consumer of a group whose rule has a calibrated ``importance``
(``"activation"``, ``"obs"``, a registered one) or ``reconstruct``, :func:`insert_channel_observers`
puts an augmented :class:`~fx_sparsify.hessian.HessianObserver` on the layer's input (shared by layers
reading the same input); its statistic ``Σ [x, 1]ᵀ[x, 1]`` is all ``step()`` reads. At ``step()``,
:func:`channel_step` scores the groups (``fx_sparsify.methods.channel_importance``), chooses the kept
units (:func:`~.masks.channel_masks`), and refits each consumer of a ``reconstruct`` rule on its kept
columns. With ``"sequential": true`` the groups of a rule are pruned one after another in graph order,
the recorded calibration inputs run again before each so its consumers see the already pruned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ...hessian import SUM_DTYPE, HessianObserver, add_product
from ...methods.channel_importance import ConsumerStats, GroupStats, corrected_weight, get_channel_importance, refit
from ...spec import ChannelRule
from ..insert_activation_masks import insert_observer
from ..layer_index import LayerIndex, layer_input
from .graph import Member
from .masks import channel_masks, group_keeps, kept_units, magnitude_scores
from .plan import ChannelGroup, ChannelPlan
from .residual import ResidualRowsObserver, insert_residual_observer, pair_residual

__all__ = [
    "ChannelStatsObserver",
    "paired_replay",
    "Consumer",
    "consumers_of",
    "insert_channel_observers",
    "channel_step",
    "step_channels",
    "check_channel_calibration",
    "OBS_STEPS",
]

#: structured OBS removes this many blocks of units per group at most (1 unit per block below it)
OBS_STEPS = 16


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group's units: its weight's layout ``"linear"`` (out, in), ``"addmm"`` (in, out: a
    GPT-2 ``Conv1D``) or ``"conv"`` (out, in, kh, kw: read through unfolded patches)."""

    layer: str
    weight: str
    bias: str | None
    layout: str
    unfold: tuple[tuple[str, Any], ...] | None = None

    def matrix(self, w: Tensor) -> Tensor:
        """The weight as it multiplies input rows: ``(out, in)``."""
        return w.T if self.layout == "addmm" else w.reshape(w.shape[0], -1)

    def back(self, m: Tensor, like: Tensor) -> Tensor:
        """``(out, in)`` back to the parameter's layout."""
        return m.T.contiguous() if self.layout == "addmm" else m.reshape(like.shape)

    def columns(self, member: Member, units: int, shape: tuple[int, ...]) -> Tensor:
        """``(units, width)``: the input columns (of the unfolded input, for a conv) each unit feeds."""
        cols = member.offset + torch.arange(units * member.width).reshape(units, member.width)
        if self.layout != "conv":
            return cols
        k = math.prod(shape[2:])
        return (cols.unsqueeze(2) * k + torch.arange(k)).reshape(units, -1)


class ChannelStatsObserver(HessianObserver):
    """The statistic ``Σ [x, 1]ᵀ[x, 1]`` of a consumer's input; for a sequential ``reconstruct`` rule
    (``keep=True``) it also keeps the rows of the calibration forwards, and while :func:`paired_replay`
    runs them again through the partly pruned module it sums ``cross = Σ [x', 1]ᵀ[x, 1]`` of the new rows
    ``x'`` against the kept ones, so the refit can aim at the calibration outputs (error correction). When
    the consumer's output is added to a residual stream (``residual``: the name of the
    :class:`~.residual.ResidualRowsObserver` on the add's other operand) it also sums
    ``residual_cross = Σ [x', 1]ᵀ(r − r')``, so the refit can aim at the add's calibration result."""

    summed = ("cross", "residual_cross")  # each rank pairs its own rows; the sums add (distributed.py)
    residual: str | None = None  # class defaults: observers pickled before the option existed
    residual_cross: Tensor | None = None

    def __init__(self, unfold: dict[str, Any] | None = None, keep: bool = False) -> None:
        super().__init__(torch.float32, unfold=unfold, augment=True)
        self.keep = keep
        self.kept: list[Tensor] = []
        self.replay_at: int | None = None
        self.cross: Tensor | None = None
        self.residual = None
        self.residual_cross = None

    def _observe(self, x: Tensor) -> None:
        if self.replay_at is not None:
            if self.replay_at < len(self.kept):
                rows, kept = self.rows(x), self.kept[self.replay_at]
                if self.cross is None:  # summed in float64 as the statistic is (one result whatever the order)
                    self.cross = kept.new_zeros(rows.shape[1], kept.shape[1], dtype=SUM_DTYPE)
                add_product(self.cross, rows, kept)
                pair_residual(self, rows)
            self.replay_at += 1
        elif self.keep:
            self.kept.append(self.rows(x))
        super()._observe(x)

    def clear_kept(self) -> None:
        self.kept, self.replay_at, self.cross, self.residual_cross = [], None, None, None


def with_residuals(gm: GraphModule, names: set[str]) -> set[str]:
    """``names`` and the residual observers their consumer observers pair with."""
    more = {getattr(gm.get_submodule(n), "residual", None) for n in names}
    return names | {n for n in more if n}


def paired_replay(gm: GraphModule, names: set[str], replay: Callable[[set[str]], None]) -> None:
    """``replay(names)`` (and their residual observers) with the observers pairing the new rows with the kept
    calibration rows; a replay that did not see as many batches as were kept leaves no ``cross`` (no error
    correction then), a consumer whose residual differences were not ready in each batch no ``residual_cross``."""
    names = with_residuals(gm, names)
    modules = [gm.get_submodule(n) for n in names]
    observers = [o for o in modules if isinstance(o, ChannelStatsObserver)]
    partners = [o for o in modules if isinstance(o, ResidualRowsObserver)]
    for o in observers:
        o.replay_at, o.cross, o.residual_cross = 0, None, None
        o.__dict__["residual_broken"] = False
        o.__dict__["partner"] = gm.get_submodule(o.residual) if o.residual else None
    for p in partners:
        p.replay_at, p.diffs = 0, []
    try:
        replay(names)
    finally:
        for o in observers:
            if o.replay_at != len(o.kept):
                o.cross = None
            if o.cross is None or o.__dict__.pop("residual_broken", False):
                o.residual_cross = None
            o.replay_at = None
            o.__dict__.pop("partner", None)
        for p in partners:
            p.replay_at, p.diffs = None, []  # the differences were folded into the consumers' residual_cross


def _unfold(name: str, conv: nn.Module) -> tuple[tuple[str, Any], ...]:
    why = None
    if not isinstance(conv, nn.Conv2d):
        why = f"a {type(conv).__name__} (only Linear, Conv1D and Conv2d consumers are read as input rows)"
    elif conv.groups != 1:
        why = f"groups={conv.groups}"
    elif conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        why = f"padding {conv.padding!r} ({conv.padding_mode})"
    if why is not None:
        raise ValueError(
            f"channels rule with a calibrated importance or reconstruct: consumer {name!r} is {why}; "
            "its inputs cannot be read as rows of its weight. Use 'importance': 'magnitude' without "
            "'reconstruct' for this group, or select other layers"
        )
    assert isinstance(conv, nn.Conv2d)
    return (
        ("kernel_size", conv.kernel_size),
        ("dilation", conv.dilation),
        ("padding", conv.padding),
        ("stride", conv.stride),
    )


def consumers_of(gm: GraphModule, group: ChannelGroup) -> list[tuple[Consumer, Member]]:
    """The consumer layers of ``group`` with the member (their input columns) it prunes."""
    params = dict(gm.named_parameters())
    out = []
    for m in group.members:
        if not (m.consumer and m.is_param and m.tensor.endswith("weight")):
            continue
        layer = m.tensor[: -len("weight")].rstrip(".")
        shape = tuple(params[m.tensor].shape)
        bias_name = f"{layer}.bias" if layer else "bias"
        bias = bias_name if bias_name in params else None
        if len(shape) == 2:
            layout, unfold = ("linear" if m.dim == 1 else "addmm"), None
        elif len(shape) == 4 and m.dim == 1:
            layout, unfold = "conv", _unfold(layer, gm.get_submodule(layer))
        else:
            raise ValueError(
                f"channels rule: consumer {m.tensor!r} of shape {shape} (channels along dim {m.dim}) is "
                "not a Linear, Conv1D or Conv2d weight read along its input dim"
            )
        out.append((Consumer(layer, m.tensor, bias, layout, unfold), m))
    return out


def _calibrated_groups(plan: ChannelPlan) -> list[ChannelGroup]:
    return [g for g in plan.groups if g.removable and g.rule is not None and plan.rules[g.rule].calibrated]


def insert_channel_observers(gm: GraphModule, plan: ChannelPlan, aliases: Mapping[str, str]) -> dict[str, str]:
    """An augmented Hessian observer on the input of every consumer of a calibrated rule; layer → observer."""
    index = LayerIndex(gm, aliases)
    made: dict[str, str] = {}
    shared: dict[tuple[Any, ...], str] = {}
    for group in _calibrated_groups(plan):
        for consumer, _ in consumers_of(gm, group):
            if consumer.layer in made:
                continue
            calls = index(consumer.layer)
            if not calls:
                raise ValueError(f"channels rule: consumer layer {consumer.layer!r} is never called in the graph")
            carriers = dict(index.weight_uses(consumer.layer)) if any(c.op != "call_module" for c in calls) else {}
            key = (tuple(layer_input(gm, c, consumer.layer, carriers.get(c)) for c in calls), consumer.unfold)
            if key in shared:
                made[consumer.layer] = shared[key]
                rule = plan.rules[group.rule]  # type: ignore[index]
                if rule.sequential and rule.reconstruct:
                    gm.get_submodule(shared[key]).keep = True  # type: ignore[assignment]  # an observer's flag
                _drop_residual(gm, shared[key])  # two consumers of one input: no single add to aim at
                continue
            rule = plan.rules[group.rule]  # type: ignore[index]
            observer = ChannelStatsObserver(
                None if consumer.unfold is None else dict(consumer.unfold), keep=rule.sequential and rule.reconstruct
            )
            name = insert_observer(gm, index, consumer.layer, calls, observer, False, "channel_stats_observer")[
                "observer"
            ]
            made[consumer.layer] = shared[key] = name
            if observer.keep and consumer.unfold is None and len(calls) == 1:  # its refit may aim at the add's sum
                observer.residual = insert_residual_observer(gm, consumer.layer, calls[0])
    return made


def _drop_residual(gm: GraphModule, name: str) -> None:
    observer = gm.get_submodule(name)
    partner = getattr(observer, "residual", None)
    if partner:
        observer.residual = None  # type: ignore[assignment]
        gm.get_submodule(partner).keep = False  # type: ignore[assignment]  # an observer's flag: keeps no rows


def check_channel_calibration(gm: GraphModule, plan: ChannelPlan, observers: Mapping[str, str]) -> None:
    """``ValueError`` naming the rules and consumer layers that saw no calibration forward since the last step."""
    missing: dict[str, list[str]] = {}
    for group in _calibrated_groups(plan):
        rule = plan.rules[group.rule]  # type: ignore[index]
        for consumer, _ in consumers_of(gm, group):
            if int(gm.get_submodule(observers[consumer.layer]).batches) == 0:  # type: ignore[arg-type]
                missing.setdefault(rule.target, [])
                if consumer.layer not in missing[rule.target]:
                    missing[rule.target].append(consumer.layer)
    if missing:
        what = "; ".join(f"rule {t!r}: {', '.join(map(repr, layers))}" for t, layers in missing.items())
        raise ValueError(
            f"step(): channels rules with a calibrated importance or 'reconstruct' need calibration "
            f"forwards (sgm(batch)) before each step(); no forward reached the consumer layers of {what}"
        )


Corrections = Mapping[str, tuple[Tensor, Tensor | None]]  # consumer layer -> (weight (out, in), bias) to aim at


def _consumer_stats(
    gm: GraphModule,
    group: ChannelGroup,
    observers: Mapping[str, str],
    masks: Mapping[str, Tensor],
    corrected: Corrections | None = None,
) -> list[ConsumerStats]:
    out = []
    for consumer, member in consumers_of(gm, group):
        w = gm.get_parameter(consumer.weight).detach()
        shape = tuple(w.shape)
        mask = masks.get(consumer.weight)
        if mask is not None:
            w = w * mask.to(device=w.device, dtype=w.dtype)
        bias = None if consumer.bias is None else gm.get_parameter(consumer.bias).detach()
        matrix = consumer.matrix(w)
        if corrected and consumer.layer in corrected:
            matrix, bias = corrected[consumer.layer]
        gram = gm.get_submodule(observers[consumer.layer]).hessian()  # type: ignore[operator]
        out.append(
            ConsumerStats(
                consumer.layer,
                matrix,
                bias,
                gram,  # type: ignore[arg-type]
                consumer.columns(member, group.units, shape),
            )
        )
    return out


def _corrections(
    gm: GraphModule, plan: ChannelPlan, group: ChannelGroup, observers: Mapping[str, str], masks: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Consumer layer → the weight and bias that best give its calibration outputs from its replayed inputs."""
    out = {}
    damp = float(plan.rules[group.rule].damp)  # type: ignore[index]
    for stats in _consumer_stats(gm, group, observers, masks):
        observer = gm.get_submodule(observers[stats.name])
        cross = getattr(observer, "cross", None)
        if cross is not None:
            residual = getattr(observer, "residual_cross", None)
            if residual is not None and residual.shape[1] != stats.weight.shape[0]:
                residual = None  # the stream's rows are not the consumer's output rows (a reshape between)
            out[stats.name] = corrected_weight(stats, cross, damp, residual)
    return out


def _scorer(
    observers: Mapping[str, str],
    steps: int,
    corrected: Corrections | None = None,
) -> Callable[[GraphModule, ChannelGroup, Mapping[str, Tensor], ChannelRule], Tensor]:
    def score(gm: GraphModule, group: ChannelGroup, masks: Mapping[str, Tensor], rule: ChannelRule) -> Tensor:
        magnitude = magnitude_scores(gm, group, masks, rule)
        fn, calibrated = get_channel_importance(rule.importance)
        if rule.importance == "magnitude":
            return magnitude
        consumers = _consumer_stats(gm, group, observers, masks, corrected) if calibrated or rule.reconstruct else []
        kept = kept_units(rule, group, steps)
        removable = group.units - (rule.min_channels if kept is None else kept)
        stats = GroupStats(
            group.units,
            consumers,
            magnitude,
            pruned=None if kept is None else removable,
            damp=float(rule.damp),
            block=max(1, math.ceil(removable / OBS_STEPS)),
        )
        scores = torch.as_tensor(fn(stats), dtype=torch.float64).flatten().cpu()
        if scores.numel() != group.units or bool(torch.isnan(scores).any()):
            raise ValueError(
                f"channel importance {rule.importance!r} returned {scores.numel()} scores (NaN: "
                f"{bool(torch.isnan(scores).any())}) for a group of {group.units} units; it must return "
                "one finite score per unit"
            )
        return scores

    return score


def _refits(
    gm: GraphModule,
    plan: ChannelPlan,
    groups: list[ChannelGroup],
    keeps: Mapping[int, Tensor],
    observers: Mapping[str, str],
    masks: Mapping[str, Tensor],
    corrected: Corrections | None = None,
) -> dict[str, Tensor]:
    """Parameter FQN → refit weight / bias of every consumer of ``groups`` (their rules' ``reconstruct``)."""
    removed: dict[Consumer, list[Tensor]] = {}
    damp: dict[Consumer, float] = {}
    for g in groups:
        rule = plan.rules[g.rule]  # type: ignore[index]
        if not rule.reconstruct:
            continue
        for consumer, member in consumers_of(gm, g):
            shape = tuple(gm.get_parameter(consumer.weight).shape)
            removed.setdefault(consumer, []).append(consumer.columns(member, g.units, shape)[~keeps[g.id]].reshape(-1))
            damp[consumer] = float(rule.damp)
    out: dict[str, Tensor] = {}
    for consumer, cols in removed.items():
        param = gm.get_parameter(consumer.weight).detach()
        mask = masks.get(consumer.weight)
        w = consumer.matrix(param if mask is None else param * mask.to(device=param.device, dtype=param.dtype))
        keep = torch.ones(w.shape[1], dtype=torch.bool)
        keep[torch.cat(cols)] = False
        bias = None if consumer.bias is None else gm.get_parameter(consumer.bias).detach()
        if corrected and consumer.layer in corrected:
            w, bias = corrected[consumer.layer]
        gram = gm.get_submodule(observers[consumer.layer]).hessian()  # type: ignore[operator]
        stats = ConsumerStats(consumer.layer, w, bias, gram, torch.arange(w.shape[1]).reshape(-1, 1))  # type: ignore[arg-type]
        new_w, new_b = refit(stats, keep, damp[consumer])
        out[consumer.weight] = consumer.back(new_w, param)
        if new_b is not None and consumer.bias is not None:
            out[consumer.bias] = new_b
        else:
            plan.unbiased.add(consumer.weight)
    return out


def step_channels(
    gm: GraphModule,
    plan: ChannelPlan,
    buffers: Mapping[str, str],
    steps: int,
    replay: Callable[[set[str]], None] | None = None,
    on_refit: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`channel_step` for a sparse module: ``buffers`` maps each channels target (its parameter FQN) to
    its mask buffer. Sequential rules write their groups' masks and refits as they go; if anything
    raises, every mask and parameter they wrote is put back before the error propagates. ``on_refit(n)``
    is called as ``n`` more groups have been refit (progress)."""
    current = {name: gm.get_buffer(buffer) for name, buffer in buffers.items()}
    saved: dict[str, tuple[Tensor, bool]] = {}

    def write(masks: dict[str, Tensor], params: dict[str, Tensor]) -> None:
        for name, keep in masks.items():
            buf = gm.get_buffer(buffers[name])
            saved.setdefault(buffers[name], (buf.clone(), True))
            buf.copy_(keep.to(device=buf.device, dtype=buf.dtype))
        for name, value in params.items():
            p = gm.get_parameter(name)
            saved.setdefault(name, (p.detach().clone(), False))
            p.detach().copy_(value.to(device=p.device, dtype=p.dtype))

    try:
        out = channel_step(gm, plan, plan.observers, current, steps, replay, write, on_refit)
        for name in with_residuals(gm, set(plan.observers.values())):
            observer = gm.get_submodule(name)
            if isinstance(observer, (ChannelStatsObserver, ResidualRowsObserver)):
                observer.clear_kept()  # the calibration rows live until the step that used them
        return out
    except BaseException:
        for name, (value, is_buffer) in saved.items():
            (gm.get_buffer(name) if is_buffer else gm.get_parameter(name)).detach().copy_(value)
        raise


def channel_step(
    gm: GraphModule,
    plan: ChannelPlan,
    observers: Mapping[str, str],
    masks: Mapping[str, Tensor],
    steps: int,
    replay: Callable[[set[str]], None] | None = None,
    write: Callable[[dict[str, Tensor], dict[str, Tensor]], None] | None = None,
    on_refit: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameter FQN → keep-mask, parameter FQN → refit value) for every channels rule.

    Rules with ``"sequential": true`` go last, one group at a time in graph order: ``write(masks, params)``
    writes each group's result and ``replay(observers)`` re-runs the calibration inputs with only the
    next group's consumer observers listening (both given by the caller, who restores on failure).
    """
    check_channel_calibration(gm, plan, observers)
    plan.unbiased = set()
    score = _scorer(observers, steps)
    sequential = {i for i, r in enumerate(plan.rules) if r.sequential}
    now = ChannelPlan([g for g in plan.groups if g.rule not in sequential], plan.rules)
    new_masks = channel_masks(gm, now, masks, steps, score)
    keeps = group_keeps(now, new_masks)
    refit_now = [g for g in now.groups if g.id in keeps and g.rule is not None]
    new_params = _refits(
        gm, plan, refit_now, keeps, observers, masks
    )  # the target: the consumers' outputs as calibrated, before this step's masks
    done = on_refit or (lambda n: None)
    done(len([g for g in refit_now if plan.rules[g.rule].reconstruct]))  # type: ignore[index]
    later = [g for g in plan.groups if g.rule in sequential and g.removable]
    if not later:
        return new_masks, new_params
    if replay is None or write is None:
        raise ValueError("step(): 'sequential' channels rules need the recorded calibration inputs")
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    first_use = {
        name: min(
            (order.get(n.name, 0) for n in gm.graph.nodes if n.op == "call_module" and n.target == name), default=0
        )
        for name in set(observers.values())
    }
    later.sort(key=lambda g: min(first_use[observers[c.layer]] for c, _ in consumers_of(gm, g)))
    write(new_masks, new_params)
    for i, g in enumerate(later):
        mine = {observers[c.layer] for c, _ in consumers_of(gm, g)}
        if i:
            paired_replay(gm, mine, replay)
        current = {**masks, **new_masks}
        corrected = _corrections(gm, plan, g, observers, current) if i else {}
        one = ChannelPlan([g], plan.rules)
        group_masks = channel_masks(gm, one, current, steps, _scorer(observers, steps, corrected))
        group_params = _refits(gm, plan, [g], group_keeps(one, group_masks), observers, current, corrected)
        write(group_masks, group_params)
        done(1 if plan.rules[g.rule].reconstruct else 0)  # type: ignore[index]
        new_masks.update(group_masks)
        new_params.update(group_params)
    return new_masks, new_params
