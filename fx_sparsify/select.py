"""Resolve spec selectors to the model's parameters (SPEC §3 "Selecting targets").

A selector is a module FQN (its ``weight``), a tensor FQN, a glob over FQNs, ``"re:<regex>"`` or
``"type:<ClassName>"``. A glob or regex selects the weights of the modules it matches and the tensors it
matches, biases only when the pattern itself names them (``conv*`` selects ``conv1.weight``, not
``conv1.bias``; ``conv*.bias`` selects the biases). Tied parameters resolve to one canonical name (the first
FQN under which ``named_parameters`` lists them). Rules apply in order and the last rule that selects a tensor wins;
``"method": "dense"`` excludes it. A rule that selects nothing is an error naming the closest FQNs.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from torch import nn
from torch.nn.utils import parametrize

from ._caller import user_stacklevel
from .spec import ActivationRule, ChannelRule, GlobalRule, SparsitySpec, WeightRule

if TYPE_CHECKING:  # annotations only: the passes import this module
    from .passes.channels import ChannelPlan

__all__ = [
    "WeightTarget",
    "Selection",
    "param_aliases",
    "select",
    "select_layers",
    "resolve_weight_targets",
    "resolve_activation_targets",
]


@dataclass(frozen=True)
class WeightTarget:
    """A parameter to sparsify: its canonical FQN, the rule that won, and its global group (if any)."""

    name: str
    rule: WeightRule | GlobalRule | ChannelRule  # ChannelRule: a member of a channel group (channels/plan.py)
    group: int | None = None


@dataclass
class Selection:
    """What a spec selects in a model, found before capture: what the passes that insert masks and observers
    work from (``pass(gm, selection)``)."""

    spec: SparsitySpec
    aliases: dict[str, str]  # every FQN of a parameter -> its canonical FQN
    targets: dict[str, WeightTarget]  # weight targets, with the channel groups' members once planned
    layers: dict[str, ActivationRule] = field(default_factory=dict)  # activation-masked layers
    norm_layers: dict[str, str] = field(default_factory=dict)  # Wanda: layer -> its weight target
    # sparsegpt: layer -> (weight target, Hessian dtype, sequential, unfold of a conv)
    hessian_layers: dict[str, tuple[str, str, bool, dict[str, Any] | None]] = field(default_factory=dict)
    channels: ChannelPlan | None = None  # the channel groups, planned on the captured graph


def param_aliases(model: nn.Module) -> dict[str, str]:
    """Every FQN under which a parameter is reachable → its canonical FQN."""
    canonical: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(p), name)
    return out


def type_name(module: nn.Module) -> str:
    """What ``type:<ClassName>`` matches: the class name (a parametrized ``Linear`` is still ``Linear``)."""
    cls = type(module)
    return cls.__mro__[1].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _own_tensors(aliases: dict[str, str], fqn: str) -> list[str]:
    """FQNs of the parameters module ``fqn`` holds directly (not through a submodule)."""
    prefix = f"{fqn}." if fqn else ""
    return [n for n in aliases if n.startswith(prefix) and "." not in n[len(prefix) :]]


def _module_weight(model: nn.Module, fqn: str, aliases: dict[str, str], where: str) -> str | None:
    name = f"{fqn}.weight" if fqn else "weight"
    found = aliases.get(name)
    module = model.get_submodule(fqn)
    if found is None and parametrize.is_parametrized(module, "weight"):  # never skip it without a word
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])  # type: ignore[union-attr, index]
        originals = ", ".join(repr(n) for n in aliases if n.startswith(f"{fqn}.parametrizations.weight."))
        raise ValueError(
            f"{where}: {name!r} is computed by a parametrization ({kinds}), so it is not a parameter to mask. "
            f"Target the parametrization's own tensors by FQN ({originals}), or remove it first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')."
        )
    return found


def _warn_subclasses_left_out(
    model: nn.Module, selectors: dict[str, str], aliases: dict[str, str], chosen: Mapping[str, Any]
) -> None:
    """``type:`` matches the exact class: say which modules of a subclass no rule selected (nn.MultiheadAttention's
    ``out_proj`` is a ``NonDynamicallyQuantizableLinear``), rather than leave them dense without a word.

    ``selectors``: each ``type:`` class name used → where (the first rule naming it)."""
    for cls, where in selectors.items():
        left = [
            (n, type_name(m))
            for n, m in model.named_modules()
            if type_name(m) != cls
            and any(c.__name__ == cls for c in type(m).__mro__[1:])
            and aliases.get(f"{n}.weight") is not None
            and aliases[f"{n}.weight"] not in chosen
        ]
        if not left:
            continue
        kinds = sorted({k for _, k in left})
        warnings.warn(
            f"{where}: 'type:{cls}' matches that class exactly, so {len(left)} module(s) of its subclasses stay dense: "
            + ", ".join(f"{n!r} ({k})" for n, k in left[:4])
            + (" ..." if len(left) > 4 else "")
            + f". Add {' and '.join(repr('type:' + k) for k in kinds)} (or their names) to prune them too, or name "
            "the layers you want",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _pattern_may_pick(selector: str, param: str) -> bool:
    """A glob or regex picks weights: a bias (``conv1.bias`` under ``conv*``) only when the pattern names it."""
    return "bias" not in param.rpartition(".")[2] or "bias" in selector


def select(selector: str, model: nn.Module, aliases: dict[str, str], where: str) -> list[str]:
    """Canonical parameter FQNs that ``selector`` picks, in model order; errors if none."""
    modules = [n for n, _ in model.named_modules(remove_duplicate=False)]
    found: list[str | None] = []
    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as err:
            raise ValueError(f"{where}: {selector!r} is not a valid regular expression ({err})") from None
        found += [_module_weight(model, m, aliases, where) for m in modules if pattern.fullmatch(m)]
        found += [aliases[p] for p in aliases if pattern.fullmatch(p) and _pattern_may_pick(selector, p)]
    elif selector.startswith("type:"):
        cls = selector[5:]
        matched = [n for n, m in model.named_modules(remove_duplicate=False) if type_name(m) == cls]
        found += [_module_weight(model, n, aliases, where) for n in matched]
        if found and not any(found):  # modules of that type, none with a 'weight' (LSTM, MultiheadAttention, ...)
            own = _own_tensors(aliases, matched[0])
            raise ValueError(
                f"{where}: modules of type {cls!r} have no parameter 'weight'; select their tensors by FQN or glob "
                f"instead (e.g. {', '.join(repr(n) for n in own[:4]) or repr(matched[0] + '.*')})"
            )
        if not found:
            types = sorted({type_name(m) for m in model.modules()})
            close = difflib.get_close_matches(cls, types, n=3) or types[:8]
            raise ValueError(
                f"{where}: no module of type {cls!r} in the model; module types present include: {', '.join(close)}"
            )
    elif any(c in selector for c in "*?["):
        found += [_module_weight(model, m, aliases, where) for m in modules if fnmatch.fnmatchcase(m, selector)]
        found += [aliases[p] for p in aliases if fnmatch.fnmatchcase(p, selector) and _pattern_may_pick(selector, p)]
    elif selector in aliases:
        found.append(aliases[selector])
    elif selector in modules:
        weight = _module_weight(model, selector, aliases, where)
        if weight is None:
            own = [n.rsplit(".", 1)[-1] for n in _own_tensors(aliases, selector)]
            raise ValueError(
                f"{where}: module {selector!r} has no parameter 'weight'; select a tensor by its FQN instead"
                + (f" (its parameters: {', '.join(own)})" if own else f" or a glob such as '{selector}.*.weight'")
            )
        found.append(weight)
    out = list(dict.fromkeys(f for f in found if f is not None))
    if not out:
        close = difflib.get_close_matches(selector.removeprefix("re:"), [*modules, *aliases], n=5, cutoff=0.3)
        raise ValueError(
            f"{where}: target {selector!r} selects nothing in {type(model).__name__}; "
            f"closest names: {', '.join(close) or '(none)'}. Use a module FQN, a tensor FQN, a glob, "
            "'re:<regex>' or 'type:<ClassName>'."
        )
    return out


def resolve_weight_targets(spec: SparsitySpec, model: nn.Module) -> dict[str, WeightTarget]:
    """Canonical FQN → the winning rule, applying ``weights`` then ``global`` rules in order."""
    aliases = param_aliases(model)
    params = dict(model.named_parameters())
    chosen: dict[str, WeightTarget] = {}
    types: dict[str, str] = {}  # "type:" class names used -> the first rule naming one
    for i, rule in enumerate(spec.weights):
        where = f"spec['weights'][{i}] ({rule.target!r})"
        for name in select(rule.target, model, aliases, where):
            chosen[name] = WeightTarget(name, rule)
        if rule.target.startswith("type:") and rule.method != "dense":
            types.setdefault(rule.target[5:], where)
    for g, grule in enumerate(spec.global_):
        for selector in grule.targets:
            where = f"spec['global'][{g}] ({selector!r})"
            for name in select(selector, model, aliases, where):
                chosen[name] = WeightTarget(name, grule, group=g)
            if selector.startswith("type:"):
                types.setdefault(selector[5:], where)
    _warn_subclasses_left_out(model, types, aliases, chosen)
    for name in chosen:
        if not params[name].dtype.is_floating_point:
            raise TypeError(
                f"target {name!r} has dtype {params[name].dtype}; only floating-point tensors can be masked"
            )
    order = {n: i for i, n in enumerate(params)}
    return {n: t for n, t in sorted(chosen.items(), key=lambda kv: order[kv[0]]) if t.rule.method != "dense"}


def select_layers(selector: str, model: nn.Module, where: str) -> list[str]:
    """Module FQNs that ``selector`` picks (module FQN, glob, ``re:``, ``type:``); errors if none."""
    named = dict(model.named_modules())
    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as err:
            raise ValueError(f"{where}: {selector!r} is not a valid regular expression ({err})") from None
        found = [n for n in named if n and pattern.fullmatch(n)]
    elif selector.startswith("type:"):
        found = [n for n, m in named.items() if type_name(m) == selector[5:]]
    elif any(c in selector for c in "*?["):
        found = [n for n in named if n and fnmatch.fnmatchcase(n, selector)]
    else:
        found = [selector] if selector in named and selector else []
    if not found:
        close = difflib.get_close_matches(
            selector.removeprefix("re:").removeprefix("type:"), [n for n in named if n], n=5, cutoff=0.3
        )
        raise ValueError(
            f"{where}: target {selector!r} selects no layer of {type(model).__name__}; closest names: "
            f"{', '.join(close) or '(none)'}. An activation rule names the layer whose input it masks."
        )
    return found


def resolve_activation_targets(spec: SparsitySpec, model: nn.Module) -> dict[str, ActivationRule]:
    """Layer FQN → the activation rule that wins for its input (last rule wins)."""
    chosen: dict[str, ActivationRule] = {}
    for i, rule in enumerate(spec.activations):
        # any layer will do (nn.Identity, activations, ...): the activation pass checks that its input is visible
        for layer in select_layers(rule.target, model, f"spec['activations'][{i}] ({rule.target!r})"):
            chosen[layer] = rule
    return chosen
