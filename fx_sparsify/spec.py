"""The sparsity spec: frozen dataclasses with ``from_dict`` / ``to_dict`` (SPEC §3).

    >>> spec = SparsitySpec.from_dict({"weights": [{"target": "fc1", "method": "l1_unstructured",
    ...                                             "sparsity": 0.5}]})
    >>> spec.weights[0].method, spec.weights[0].options, spec.weights[0].gradient
    ('l1_unstructured', {'sparsity': 0.5}, 'mask')
    >>> SparsitySpec.from_dict(spec.to_dict()) == spec
    True

Options are flat keys beside ``method``; they are checked against the method's signature here, so
a misspelt option fails before any tensor is touched. Every error names the offending key.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ._spec_doc import SPEC_KEYS_DOC
from .methods import get_mask_method, parse_method, validate_options
from .methods.channel_importance import get_channel_importance
from .schedule import check_schedule

__all__ = ["WeightRule", "GlobalRule", "ActivationRule", "ChannelRule", "SparsitySpec"]

GRADIENT_MODES = ("mask", "ste", "supermask", "joint")
AGGREGATES = ("sum", "abs_sum", "sq_sum", "max", "abs_max")
REDUCES = ("mean", "sum", "none")


def _where(where: str, key: str) -> str:
    return f"{where}[{key!r}]" if where else repr(key)


def _resolve_method(method: Any, options: dict[str, Any], where: str) -> tuple[str, dict[str, Any], str | None]:
    """Parse a method string, merge shorthand options under explicit ones, validate against the signature."""
    if not isinstance(method, str):
        raise TypeError(
            f"{_where(where, 'method')}: expected a method name string, got {type(method).__name__}: {method!r}"
        )
    parsed = parse_method(method)
    try:
        get_mask_method(parsed.name)
        merged = {**parsed.options, **options}
        validate_options(parsed.name, merged)
    except KeyError as err:
        raise KeyError(f"{_where(where, 'method')}: {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
    return get_mask_method(parsed.name).name, merged, parsed.gradient


def _check_str(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{_where(where, key)}: expected a non-empty string, got {value!r}")
    return value


def _check_gradient(value: Any, where: str) -> str:
    if value not in GRADIENT_MODES:
        raise ValueError(f"{_where(where, 'gradient')}: got {value!r}; choose one of {', '.join(GRADIENT_MODES)}")
    return value


def _check_scores(value: Any, where: str) -> None:
    if value is not None and not (isinstance(value, str) or callable(value)):
        raise TypeError(
            f"{_where(where, 'scores')}: expected a tensor FQN string or a callable weight -> scores, got {value!r}"
        )


@dataclass(frozen=True)
class WeightRule:
    """One rule of ``"weights"``: which tensors, which method, which options."""

    target: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    gradient: str = "mask"
    scores: str | Callable[..., Any] | None = None
    regrow: bool | None = None  # None: True for gradient "ste" (pruned weights keep learning to regrow), else False
    schedule: Mapping[str, Any] | Callable[[int], float] | None = None

    _KEYS = ("target", "method", "gradient", "scores", "regrow", "schedule")

    def __post_init__(self) -> None:
        where = f"weights rule {self.target!r}"
        _check_str(self.target, "target", where)
        name, options, gradient = _resolve_method(self.method, dict(self.options), where)
        object.__setattr__(self, "method", name)
        object.__setattr__(self, "options", options)
        if gradient is not None and self.gradient == "mask":
            object.__setattr__(self, "gradient", gradient)
        _check_gradient(self.gradient, where)
        _check_scores(self.scores, where)
        if self.regrow is None:
            object.__setattr__(self, "regrow", self.gradient == "ste")
        if not isinstance(self.regrow, bool):
            raise TypeError(f"{_where(where, 'regrow')}: expected True or False, got {self.regrow!r}")
        if self.schedule is not None:
            if not (isinstance(self.schedule, Mapping) or callable(self.schedule)):
                raise TypeError(f"{_where(where, 'schedule')}: expected a dict or a callable step -> sparsity")
            check_schedule(self.schedule, _where(where, "schedule"))
            if "sparsity" not in get_mask_method(self.method).options:
                raise ValueError(f"{where}: a schedule moves 'sparsity', which method {self.method!r} does not take")
            if (
                self.options.get("sparsity") is None
                and not callable(self.schedule)
                and self.schedule.get("kind") == "cubic"
            ):
                raise KeyError(f"{where}: a cubic schedule needs the final 'sparsity' beside 'method'")
            final = self.options.get("sparsity")
            if not callable(self.schedule) and self.schedule.get("kind") == "cubic" and not isinstance(final, float):
                raise TypeError(
                    f"{where}: a cubic schedule moves a fraction, so the final 'sparsity' must be a float in "
                    f"[0, 1] (e.g. 0.5), got {type(final).__name__}: {final!r}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "weights") -> WeightRule:
        d = _require_mapping(d, where, ("target", "method"))
        return cls(**{k: d[k] for k in cls._KEYS if k in d}, options={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "method": self.method, **copy.deepcopy(self.options)}
        for key, default in (("gradient", "mask"), ("scores", None), ("regrow", False), ("schedule", None)):
            if getattr(self, key) != default:
                out[key] = copy.deepcopy(getattr(self, key))
        return out


@dataclass(frozen=True)
class GlobalRule:
    """One rule of ``"global"``: all ``targets`` ranked together (``prune.global_unstructured``)."""

    targets: tuple[str, ...]
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    scores: str | Callable[..., Any] | None = None
    regrow: bool = False

    _KEYS = ("targets", "method", "scores", "regrow")

    def __post_init__(self) -> None:
        where = f"global rule {list(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets!r}"
        if isinstance(self.targets, str) or not isinstance(self.targets, Sequence) or not self.targets:
            raise TypeError(
                f"{_where(where, 'targets')}: expected a non-empty list of target selectors, got {self.targets!r}"
            )
        object.__setattr__(self, "targets", tuple(_check_str(t, "targets", where) for t in self.targets))
        name, options, _ = _resolve_method(self.method, dict(self.options), where)
        object.__setattr__(self, "method", name)
        object.__setattr__(self, "options", options)
        _check_scores(self.scores, where)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "global") -> GlobalRule:
        d = _require_mapping(d, where, ("targets", "method"))
        return cls(**{k: d[k] for k in cls._KEYS if k in d}, options={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"targets": list(self.targets), "method": self.method, **copy.deepcopy(self.options)}
        if self.scores is not None:
            out["scores"] = self.scores
        if self.regrow:
            out["regrow"] = True
        return out


@dataclass(frozen=True)
class ActivationRule:
    """One rule of ``"activations"``: observe and mask the input of the selected layers."""

    target: str
    aggregate: str | Callable[..., Any] = "sum"
    reduce: str | Callable[..., Any] = "mean"
    mask: str | Callable[..., Any] = "threshold"
    options: dict[str, Any] = field(default_factory=dict)
    features: tuple[int, ...] | None = None
    feature_dim: int | None = None

    _KEYS = ("target", "aggregate", "reduce", "mask", "features", "feature_dim")

    def __post_init__(self) -> None:
        where = f"activations rule {self.target!r}"
        _check_str(self.target, "target", where)
        for key, names in (("aggregate", AGGREGATES), ("reduce", REDUCES)):
            value = getattr(self, key)
            if isinstance(value, str):
                if value not in names:
                    raise ValueError(
                        f"{_where(where, key)}: unknown {key} {value!r}; use one of {', '.join(names)} or a callable"
                    )
            elif not callable(value):
                raise TypeError(
                    f"{_where(where, key)}: expected a name or a callable, got {type(value).__name__}: {value!r}"
                )
        if isinstance(self.mask, str):
            name, options, _ = _resolve_method(self.mask, dict(self.options), where)
            object.__setattr__(self, "mask", name)
            object.__setattr__(self, "options", options)
        elif not callable(self.mask):
            raise TypeError(f"{_where(where, 'mask')}: expected a mask method name or a callable, got {self.mask!r}")
        if (self.features is None) != (self.feature_dim is None):
            raise ValueError(
                f"{where}: 'features' and 'feature_dim' go together (got features={self.features!r}, "
                f"feature_dim={self.feature_dim!r}); give both to mask per feature, or neither"
            )
        if self.features is not None:
            if (
                isinstance(self.features, (str, bytes))
                or not isinstance(self.features, Sequence)
                or not all(isinstance(f, numbers.Integral) and not isinstance(f, bool) for f in self.features)
            ):
                raise TypeError(
                    f"{_where(where, 'features')}: expected a list of int feature indices, got {self.features!r}"
                )
            object.__setattr__(self, "features", tuple(int(f) for f in self.features))
            if not isinstance(self.feature_dim, numbers.Integral) or isinstance(self.feature_dim, bool):
                raise TypeError(f"{_where(where, 'feature_dim')}: expected an int, got {self.feature_dim!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "activations") -> ActivationRule:
        d = _require_mapping(d, where, ("target",))
        return cls(**{k: d[k] for k in cls._KEYS if k in d}, options={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "aggregate": self.aggregate,
            "reduce": self.reduce,
            "mask": self.mask,
            **copy.deepcopy(self.options),
        }
        out["features"] = list(self.features) if self.features is not None else None
        out["feature_dim"] = self.feature_dim
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChannelRule:
    """One rule of ``"channels"``: prune output channels (or attention heads) of the selected layers.

    ``sparsity``: a float fraction or an int count of each group's channels (with ``global``: of all the rule's
    channels); ``heads``: a fraction or count of query heads per attention block; ``p``: the norm ranking a
    group's channels; ``round_to``: kept channels a multiple of it (default 8 for a fractional sparsity on
    groups wider than 32 channels, else 1); ``min_channels``: kept channels at least this many.
    ``importance``: what ranks a group's units: ``"magnitude"`` (the joint ``p``-norm),
    ``"activation"`` (FLAP), ``"obs"`` (structured OBS) or a name registered with
    ``register_channel_importance``; ``reconstruct``: refit the consumer layers on the calibration
    statistics; ``damp``: their damping (fraction of the mean input second moment); ``sequential``:
    calibrate each group's consumers on the outputs of the groups pruned before it.
    """

    target: str
    sparsity: float | int | None = None
    heads: float | int | None = None
    p: float = 2
    global_: bool = False
    round_to: int | None = None
    min_channels: int = 1
    schedule: Mapping[str, Any] | Callable[[int], float] | None = None
    importance: str = "magnitude"
    reconstruct: bool = False
    damp: float = 0.01
    sequential: bool = False

    _KEYS = (
        "target",
        "sparsity",
        "heads",
        "p",
        "global",
        "round_to",
        "min_channels",
        "schedule",
        "importance",
        "reconstruct",
        "damp",
        "sequential",
    )
    method = "channels"  # the TargetRecord.method of the masks it owns

    @property
    def options(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity} if self.heads is None else {"heads": self.heads}

    def __post_init__(self) -> None:
        where = f"channels rule {self.target!r}"
        _check_str(self.target, "target", where)
        if (self.sparsity is None) == (self.heads is None):
            raise KeyError(
                f"{where}: give exactly one of 'sparsity' (channels) or 'heads' (attention heads), got "
                f"sparsity={self.sparsity!r}, heads={self.heads!r}"
            )
        for key in ("sparsity", "heads"):
            value = getattr(self, key)
            if value is None:
                continue
            if _is_int(value):
                if value < 0:
                    raise ValueError(f"{_where(where, key)}: a count is >= 0, got {value}")
            elif isinstance(value, float):
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{_where(where, key)}: a fraction is in [0, 1), got {value}")
            else:
                raise TypeError(f"{_where(where, key)}: expected a float fraction or an int count, got {value!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not self.p > 0:
            raise ValueError(f"{_where(where, 'p')}: expected a norm order > 0 (1, 2, float('inf')), got {self.p!r}")
        if not isinstance(self.global_, bool):
            raise TypeError(f"{_where(where, 'global')}: expected True or False, got {self.global_!r}")
        if self.global_ and self.heads is not None:
            raise ValueError(
                f"{where}: 'heads' counts query heads per attention block; 'global' ranks channels across "
                "groups and applies to 'sparsity' only: drop 'global'"
            )
        if self.round_to is not None and (not _is_int(self.round_to) or self.round_to < 1):
            raise ValueError(f"{_where(where, 'round_to')}: expected an int >= 1, got {self.round_to!r}")
        if not _is_int(self.min_channels) or self.min_channels < 1:
            raise ValueError(f"{_where(where, 'min_channels')}: expected an int >= 1, got {self.min_channels!r}")
        if self.schedule is not None:
            if not (isinstance(self.schedule, Mapping) or callable(self.schedule)):
                raise TypeError(f"{_where(where, 'schedule')}: expected a dict or a callable step -> sparsity")
            check_schedule(self.schedule, _where(where, "schedule"))
        get_channel_importance(self.importance, _where(where, "importance"))
        for key in ("reconstruct", "sequential"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{_where(where, key)}: expected True or False, got {getattr(self, key)!r}")
        if (
            isinstance(self.damp, bool)
            or not isinstance(self.damp, numbers.Real)
            or not 0 <= float(self.damp) < float("inf")
        ):
            raise ValueError(
                f"{_where(where, 'damp')}: a fraction of the mean input second moment (>= 0, e.g. 0.01); "
                f"got {self.damp!r}"
            )
        if self.sequential and self.global_:
            raise ValueError(
                f"{where}: 'sequential' prunes one group after another, 'global' ranks all groups at once; "
                "drop one of them"
            )

    @property
    def calibrated(self) -> bool:
        """Whether ``step()`` reads calibration statistics for this rule (its importance, or ``reconstruct``)."""
        return self.reconstruct or get_channel_importance(self.importance)[1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "channels") -> ChannelRule:
        d = _require_mapping(d, where, ("target",))
        unknown = [k for k in d if k not in cls._KEYS]
        if unknown:
            raise KeyError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a channels rule takes {', '.join(cls._KEYS)}"
            )
        return cls(**{("global_" if k == "global" else k): v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target}
        for key, attr, default in (
            ("sparsity", "sparsity", None),
            ("heads", "heads", None),
            ("p", "p", 2),
            ("global", "global_", False),
            ("round_to", "round_to", None),
            ("min_channels", "min_channels", 1),
            ("schedule", "schedule", None),
            ("importance", "importance", "magnitude"),
            ("reconstruct", "reconstruct", False),
            ("damp", "damp", 0.01),
            ("sequential", "sequential", False),
        ):
            if getattr(self, attr) != default:
                out[key] = copy.deepcopy(getattr(self, attr))
        return out


def _require_mapping(d: Any, where: str, required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: each rule is a dict, got {type(d).__name__}: {d!r}")
    missing = [k for k in required if k not in d]
    if missing:
        raise KeyError(f"{where}: rule {dict(d)!r} is missing {', '.join(map(repr, missing))}")
    return d


@dataclass(frozen=True)
class SparsitySpec:
    """What to sparsify and how. Build it from a dict with :meth:`from_dict`."""

    weights: tuple[WeightRule, ...] = ()
    global_: tuple[GlobalRule, ...] = ()
    activations: tuple[ActivationRule, ...] = ()
    seed: int = 0
    mode: str = "graph"
    channels: tuple[ChannelRule, ...] = ()

    def __post_init__(self) -> None:
        for key, cls in (
            ("weights", WeightRule),
            ("global_", GlobalRule),
            ("activations", ActivationRule),
            ("channels", ChannelRule),
        ):
            rules = getattr(self, key)
            if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence):
                raise TypeError(f"spec[{key.rstrip('_')!r}]: expected a list of rules, got {type(rules).__name__}")
            for rule in rules:
                if not isinstance(rule, cls):
                    raise TypeError(
                        f"spec[{key.rstrip('_')!r}]: expected {cls.__name__} entries, got {type(rule).__name__}"
                    )
            object.__setattr__(self, key, tuple(rules))
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise TypeError(f"spec['seed']: expected an int, got {self.seed!r}")
        if self.mode not in ("graph", "inplace"):
            raise ValueError(f"spec['mode']: got {self.mode!r}; use 'graph' (mask nodes) or 'inplace' (zeroed weights)")
        if self.mode == "inplace":
            for rule in self.weights:
                if rule.gradient != "mask":
                    raise ValueError(
                        f"weights rule {rule.target!r}: gradient {rule.gradient!r} needs the dense weight behind a "
                        "mask node, but spec['mode'] 'inplace' zeroes pruned weights in the model itself; use "
                        "'mode': 'graph' (the default) or 'gradient': 'mask'"
                    )
        if not (self.weights or self.global_ or self.activations or self.channels):
            raise ValueError(
                "the spec has no rules: give at least one of 'weights', 'global', 'activations' or 'channels'"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparsitySpec:
        """Build a spec from a dict (what a JSON / TOML / YAML recipe holds); every error names the key."""
        if isinstance(d, SparsitySpec):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"a spec is a dict or a SparsitySpec, got {type(d).__name__}")
        known = ("seed", "weights", "global", "activations", "mode", "channels")
        unknown = [k for k in d if k not in known]
        if unknown:
            raise KeyError(f"spec has unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")

        def rules(key: str, cls: Any) -> tuple[Any, ...]:
            items = d.get(key) or ()
            if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
                raise TypeError(f"spec[{key!r}]: expected a list of rule dicts, got {type(items).__name__}")
            return tuple(cls.from_dict(r, where=f"spec[{key!r}][{i}]") for i, r in enumerate(items))

        return cls(
            weights=rules("weights", WeightRule),
            global_=rules("global", GlobalRule),
            activations=rules("activations", ActivationRule),
            seed=d.get("seed", 0),
            mode=d.get("mode", "graph"),
            channels=rules("channels", ChannelRule),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed}
        if self.mode != "graph":
            out["mode"] = self.mode
        for key, attr in (
            ("weights", "weights"),
            ("global", "global_"),
            ("activations", "activations"),
            ("channels", "channels"),
        ):
            if getattr(self, attr):
                out[key] = [r.to_dict() for r in getattr(self, attr)]
        return out


SparsitySpec.from_dict.__func__.__doc__ = (SparsitySpec.from_dict.__doc__ or "") + SPEC_KEYS_DOC  # type: ignore[attr-defined]
