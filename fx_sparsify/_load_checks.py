"""Everything a ``SparseGraphModule.load_state_dict`` needs is checked before anything is written.

``torch.nn.Module.load_state_dict`` copies tensors module by module and collects shape mismatches to
raise at the end, so a dict of another spec or model used to leave weights overwritten, activation
masks and observer statistics re-shaped and the step count changed. :func:`check_state_dict` runs
first (from the root's ``_load_from_state_dict``) and raises :class:`StateDictError` with every
problem; only then does loading write.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # only a type here: this module stays on the ground floor (the observer uses it)
    from .state import SparsityState

__all__ = ["StateDictError", "check_state_dict", "check_extra_counts"]


class StateDictError(ValueError, RuntimeError):
    """A state dict that cannot load; nothing was written. A ``ValueError`` (our rule for bad input)
    and a ``RuntimeError`` (what ``torch.nn.Module.load_state_dict`` raises)."""


def check_extra_counts(state: Any, keys: tuple[str, ...], where: str) -> dict[str, int]:
    """``state`` as ``{key: int >= 0}`` for ``keys``, or a :class:`StateDictError` naming what is wrong."""
    if not isinstance(state, Mapping):
        raise StateDictError(
            f"{where}: expected a dict with {', '.join(map(repr, keys))}, got {type(state).__name__}: {state!r}"
        )
    out = {}
    for key in keys:
        if key not in state:
            raise StateDictError(f"{where}: missing {key!r} (got keys {sorted(state)})")
        value = state[key]
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise StateDictError(f"{where}: {key!r} must be an int >= 0, got {type(value).__name__}: {value!r}")
        out[key] = int(value)
    return out


#: the layer input's feature dimension (counted from the end) and size, by layer type: an activation mask and
#: an activation statistic of the layer's input must fit it
_INPUT_FEATURES: dict[type, Any] = {
    nn.Linear: lambda m: (-1, m.in_features),
    nn.Bilinear: lambda m: (-1, m.in1_features),
    nn.Conv1d: lambda m: (-2, m.in_channels),
    nn.Conv2d: lambda m: (-3, m.in_channels),
    nn.Conv3d: lambda m: (-4, m.in_channels),
}


def _input_features(gm: nn.Module, layer: str | None) -> tuple[int, int] | None:
    """``(dim, size)`` of the feature dimension of ``layer``'s input, where its type says it."""
    try:
        module = gm.get_submodule(layer) if layer else None
    except AttributeError:  # an export capture keeps no submodules
        return None
    rule = next((_INPUT_FEATURES[c] for c in type(module).__mro__ if c in _INPUT_FEATURES), None)
    return rule(module) if rule is not None else None


def _feature_shape(
    value: Tensor, groups: int | None, per_sample: int | None, features: tuple[int, int] | None, what: str
) -> str | None:
    """Why ``value`` (an activation mask or statistic) does not fit its layer's input, or None.

    ``groups``: the size of a leading dim of one entry per selected feature (None: no such dim); ``per_sample``:
    dims between it and the input's shape (a per-sample statistic keeps the batch dim); ``features``: see above.
    """
    shape = tuple(value.shape)
    if groups is not None:
        if not shape or shape[0] != groups:
            return f"{what} has shape {shape}; it needs a leading dim of {groups} (one entry per selected feature)"
        shape = shape[1:]
    if features is None or len(shape) < -features[0] + (per_sample or 0):
        return None
    dim, size = features
    if shape[dim] not in (1, size):
        return (
            f"{what} has shape {tuple(value.shape)}; its dim {len(value.shape) + dim} must be {size} (the layer's "
            "input features) or 1"
        )
    return None


def _shape_problems(gm: nn.Module, state: SparsityState, incoming: Mapping[str, Any]) -> list[str]:
    """Activation masks and observer statistics whose shape cannot fit the layer they belong to."""
    problems = []
    for r in state.targets.values():
        if r.kind == "activation":
            rule_features: Any = getattr(r.rule, "features", None)  # an ActivationRule's feature slices
            features = None if rule_features is not None else _input_features(gm, r.layer)
            groups = len(rule_features) if rule_features is not None else None
            mask, stat = incoming.get(r.buffer), incoming.get(f"{r.observer}.stat")
            observer = gm.get_submodule(r.observer) if r.observer else None
            if isinstance(mask, Tensor) and mask.dim() > 0:
                problems.append(_feature_shape(mask, groups, None, features, f"activation mask {r.buffer!r}"))
            if isinstance(stat, Tensor) and stat.numel() > 0 and observer is not None:
                per_sample = None if getattr(observer, "compact", True) else 1
                stat_groups = None if getattr(observer, "_fast", False) else (groups or 1)
                problems.append(
                    _feature_shape(stat, stat_groups, per_sample, features, f"observer statistic '{r.observer}.stat'")
                )
        elif getattr(r.rule, "scores", None) == "wanda" and r.observer is not None and len(r.shape) == 2:
            stat = incoming.get(f"{r.observer}.stat")
            if isinstance(stat, Tensor) and stat.numel() > 0 and tuple(stat.shape) != (1, r.shape[1]):
                problems.append(
                    f"observer statistic '{r.observer}.stat' has shape {tuple(stat.shape)}; the input "
                    f"norms of {r.param!r} take shape {(1, r.shape[1])}"
                )
    return [p for p in problems if p is not None]


def check_state_dict(
    gm: nn.Module, state: SparsityState, state_dict: Mapping[str, Any], prefix: str, strict: bool
) -> None:
    """Raise :class:`StateDictError` listing every key, shape, mask value or count that would not load."""
    own = gm.state_dict()
    incoming = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    problems: list[str] = []
    if strict:
        missing = [k for k in own if k not in incoming]
        unexpected = [k for k in incoming if k not in own]
        if missing:
            problems.append(f"missing keys: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    masks = {r.buffer for r in state.targets.values()}
    free_shape = {r.buffer for r in state.targets.values() if r.kind == "activation"}  # take reduce's shape at step()
    observers = {r.observer for r in state.targets.values() if r.observer is not None}
    free_shape |= {f"{o}.stat" for o in observers}
    for key, value in incoming.items():
        if key not in own:
            continue
        mine = own[key]
        if key.endswith("_extra_state"):
            owner = key[: -len("_extra_state")].rstrip(".")
            try:
                if not owner:
                    check_extra_counts(value, ("steps",), "the sparse module's extra state")
                elif owner in observers:
                    check_extra_counts(value, ("samples", "batches"), f"observer {owner!r}")
            except StateDictError as err:
                problems.append(str(err))
            continue
        if not isinstance(mine, Tensor):
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{key!r} must be a tensor, got {type(value).__name__}")
            continue
        if key not in free_shape and value.shape != mine.shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, this module's has {tuple(mine.shape)}")
            continue
        if key in masks and value.dtype != torch.bool:
            if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
                problems.append(f"mask {key!r} holds values other than 0 and 1 (soft or NaN); a mask keeps or prunes")
    problems += _shape_problems(gm, state, incoming)
    if problems:
        raise StateDictError(
            f"load_state_dict: the state dict does not fit this {state.class_name} sparse module (nothing was "
            "loaded):\n  "
            + "\n  ".join(problems)
            + "\nLoad a state dict saved from sparsify_graph(model, spec) with the same model and spec"
            + (", or pass strict=False to load the keys that match." if strict else ".")
        )
