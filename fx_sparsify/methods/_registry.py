"""The mask-method registry.

A mask method maps a score tensor to a boolean keep-mask of the same shape (True = kept).
Built-in methods are registered with the same decorator users call::

    >>> import torch, fx_sparsify as fxs
    >>> @fxs.register_mask_method("sign", description="keep the positive entries")
    ... def sign(tensor: torch.Tensor) -> torch.Tensor:
    ...     return tensor > 0
    >>> fxs.compute_mask("sign", torch.tensor([-1.0, 2.0]))
    tensor([False,  True])

A method's options are its keyword-only parameters; they are checked against the signature when a
spec is built, so a misspelt option fails before any tensor is touched. A method that declares a
keyword ``generator`` receives a ``torch.Generator`` seeded from the spec's seed and the target name.
A method may also register ``check=fn(shape, **options)``: it raises for options that do not fit a
tensor of that shape (a count larger than the tensor, a dim out of range, ...). It runs when the spec
is built (``shape=None``: only what needs no shape) and when the targets are known, before ``step()``
touches any tensor.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._selectors import count_to_prune, refuse_nan

__all__ = [
    "MaskMethod",
    "register_mask_method",
    "get_mask_method",
    "compute_mask",
    "available_mask_methods",
    "validate_options",
    "refuse_nan",
    "keep_mask",
]

MaskFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MaskMethod:
    """A registered mask method: its function and what its signature says about options."""

    name: str
    fn: MaskFn
    description: str
    options: tuple[str, ...]
    required: tuple[str, ...]
    takes_generator: bool
    check: Callable[..., Any] | None = None
    pruned_score: float = 0.0

    def check_shape(self, shape: tuple[int, ...] | None, options: Mapping[str, Any], where: str = "") -> None:
        """Raise if ``options`` cannot apply to a tensor of ``shape`` (``None``: of any shape); no tensor is touched.

        ``where`` (e.g. ``"target 'fc1.weight'"``) and the shape prefix the error's message.
        """
        if self.check is None:
            return
        try:
            self.check(None if shape is None else tuple(shape), **options)
        except (ValueError, TypeError) as err:
            if not where:
                raise
            raise type(err)(f"{where} (shape {tuple(shape or ())}): {err}") from None

    def __call__(self, tensor: Tensor, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
        validate_options(self.name, options)
        refuse_nan(tensor, "the scores")
        if not (getattr(self.fn, "__module__", None) or "").startswith("fx_sparsify."):
            tensor = tensor.clone()  # a user's method may edit its input: never hand it a live weight
        if self.takes_generator:
            options["generator"] = generator
        return keep_mask(self.fn(tensor, **options), tuple(tensor.shape), f"mask method {self.name!r}")


def keep_mask(mask: Any, shape: tuple[int, ...], who: str) -> Tensor:
    """``mask`` as a boolean keep-mask of ``shape``, or a ``ValueError`` / ``TypeError`` saying what is wrong.

    A mask is a bool tensor (True = kept) or holds only 0 and 1: a soft (0.5), NaN, wrong-shaped or
    ``None`` mask is refused rather than rounded.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{who} returned {type(mask).__name__} for a tensor of shape {shape}; it must return a keep-mask "
            "tensor of the same shape (bool, True = kept)"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{who} returned a mask of shape {tuple(mask.shape)} for a tensor of shape {shape}; "
            "a mask method must return a mask of the same shape as its input"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].reshape(-1)[:3].tolist() if not mask.is_complex() else "complex"
        raise ValueError(
            f"{who} returned a mask with values other than 0 and 1 (e.g. {odd}); a mask keeps or prunes each "
            "entry: return a bool tensor (True = kept) or 0/1 values"
        )
    return mask != 0


_REGISTRY: dict[str, MaskMethod] = {}
_ALIASES: dict[str, str] = {}


def _describe(fn: MaskFn, description: str | None) -> str:
    if description:
        return description
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def register_mask_method(
    name: str,
    *,
    description: str | None = None,
    aliases: tuple[str, ...] = (),
    override: bool = False,
    check: Callable[..., Any] | None = None,
    pruned_score: float = 0.0,
) -> Callable[[MaskFn], MaskFn]:
    """Register ``fn(tensor, *, **options) -> bool mask`` under ``name`` (and ``aliases``).

    ``check(shape, **options)``, if given, raises ``ValueError`` / ``TypeError`` for options that do not
    fit a tensor of ``shape``; it runs when the spec is built with ``shape=None`` (check what needs no
    shape) and again when the targets are known, before any mask is computed.
    ``pruned_score`` is what ``step()`` shows the method in place of an already-pruned entry: ``0`` suits
    methods that rank magnitudes; a method that ranks raw values (``topk``) needs ``-inf``.

    Registering a taken name raises ``ValueError`` unless ``override=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a mask method name must be a non-empty string, got {name!r}")

    def decorator(fn: MaskFn) -> MaskFn:
        if not callable(fn):
            raise TypeError(f"register_mask_method({name!r}) decorates a function, got {type(fn).__name__}")
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(
                f"mask method {name!r} must take the score tensor as its first positional argument, "
                "then keyword options: def method(tensor, *, option=default) -> Tensor"
            )
        keyword = [p for p in params[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        options = tuple(p.name for p in keyword if p.name != "generator")
        required = tuple(p.name for p in keyword if p.name != "generator" and p.default is inspect.Parameter.empty)
        method = MaskMethod(
            name=name,
            fn=fn,
            description=_describe(fn, description),
            options=options,
            required=required,
            takes_generator=any(p.name == "generator" for p in keyword),
            check=check,
            pruned_score=float(pruned_score),
        )
        for key in (name, *aliases):
            if not override and (key in _REGISTRY or key in _ALIASES):
                raise ValueError(
                    f"a mask method named {key!r} is already registered; "
                    "pass override=True to register_mask_method to replace it"
                )
        _REGISTRY[name] = method
        _ALIASES.pop(name, None)
        for alias in aliases:
            _REGISTRY.pop(alias, None)
            _ALIASES[alias] = name
        return fn

    return decorator


def get_mask_method(name: str) -> MaskMethod:
    """The registered method called ``name`` (or an alias of it); ``KeyError`` lists the known names."""
    if not isinstance(name, str):
        raise TypeError(f"a mask method is named by a string, got {type(name).__name__}: {name!r}")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        known = sorted([*_REGISTRY, *_ALIASES])
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"unknown mask method {name!r}.{hint} Known methods: {', '.join(known)}. "
            "Register your own with @fx_sparsify.register_mask_method(name)."
        )
    return _REGISTRY[key]


_AMOUNTS = frozenset({"sparsity", "density", "amount"})


def validate_options(name: str, options: Mapping[str, Any]) -> None:
    """Check option names against the method's signature (``TypeError`` names the bad key), and that a
    fractional ``sparsity`` / ``density`` / ``amount`` lies in [0, 1] (``ValueError``)."""
    method = get_mask_method(name)
    unknown = [k for k in options if k not in method.options]
    if unknown:
        close = {k: difflib.get_close_matches(k, method.options, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        accepted = ", ".join(method.options) or "none"
        raise TypeError(f"mask method {method.name!r} got unknown option {hints}; it accepts: {accepted}")
    missing = [k for k in method.required if k not in options]
    if missing:
        raise TypeError(f"mask method {method.name!r} needs option(s) {', '.join(map(repr, missing))}")
    for key in _AMOUNTS.intersection(options):  # the range of a fraction is known before any tensor is
        if options[key] is not None:
            count_to_prune(options[key], sys.maxsize, what=f"mask method {method.name!r}: {key}")
    method.check_shape(None, options)


def compute_mask(name: str, tensor: Tensor, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
    """Compute the boolean keep-mask of ``tensor`` with the method ``name`` (a name or a shorthand)."""
    from ._shorthand import parse_method

    if not isinstance(tensor, Tensor):
        raise TypeError(f"compute_mask needs a torch.Tensor, got {type(tensor).__name__}")
    parsed = parse_method(name)
    merged = {**parsed.options, **options}
    return get_mask_method(parsed.name)(tensor.detach(), generator=generator, **merged)


def available_mask_methods() -> dict[str, str]:
    """``{name: one-line description}`` of every registered method and alias."""
    out = {name: m.description for name, m in sorted(_REGISTRY.items())}
    for alias, target in sorted(_ALIASES.items()):
        out[alias] = f"alias of {target!r}"
    return out
