"""What an export capture fixes at capture time, made explicit.

* ``torch.export`` guards the captured graph's input shapes with a generated ``_guards_fn`` module: a
  call with another shape fails with a bare ``AssertionError: Guard failed``, and the module (a local
  function) cannot be pickled, so ``torch.save`` of a squashed export capture failed half-way through
  writing. :class:`ExportGuards` runs the same guard code, re-raises a failure as a ``ValueError``
  naming ``dynamic_shapes``, and pickles (the guard's code object travels marshalled).
* Dropout and batch norm are traced in the mode the model was in: :func:`warn_mode` says so at
  capture (training mode) and when ``train()`` / ``eval()`` asks a captured module for the other mode.
"""

from __future__ import annotations

import builtins
import marshal
import math
import types
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ._caller import user_stacklevel

__all__ = ["ExportGuards", "own_guards", "mode_dependent_modules", "warn_mode", "quiet_deepcopy", "LEAFSPEC_WARNING"]

_GUARDS = "_guards_fn"


def _namespace() -> dict[str, Any]:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP  # what torch.export's guard code runs in

    # with __builtins__, as any module's globals: torch.compile / strict torch.export read the function's
    # builtins from it (KeyError: '__builtins__' without)
    return {**SYMPY_INTERP, "math": math, "inf": math.inf, "torch": torch, "__builtins__": builtins}


class ExportGuards(nn.Module):
    """torch.export's input guards: the same checks, a ``ValueError`` that says what to do, picklable."""

    _is_impure = True  # a call without users: dead-code elimination must keep it

    def __init__(self, code: bytes) -> None:
        super().__init__()
        self.code = code
        self._fn: Callable[..., Any] = types.FunctionType(marshal.loads(code), _namespace())

    def forward(self, *args: Any) -> None:
        try:
            self._fn(*args)
        except AssertionError as err:
            raise ValueError(
                f"this module was captured by torch.export for inputs shaped like the example inputs, and this call "
                f"breaks its guard ({err}). Pass dynamic_shapes=... to fxs.sparsify_graph for sizes that vary (e.g. "
                "dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) for the batch size of one input), or call it with "
                "inputs of the captured shapes"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_fn", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fn = types.FunctionType(marshal.loads(self.code), _namespace())


def _guard_function(forward: Any) -> types.FunctionType | None:
    """The generated guard function inside torch's wrapper (``None`` if torch's layout changed)."""
    seen: list[Any] = [forward]
    while seen:
        fn = seen.pop()
        if isinstance(fn, types.FunctionType) and fn.__code__.co_filename == "<string>":
            return fn
        seen += [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        if hasattr(fn, "__wrapped__"):
            seen.append(fn.__wrapped__)
    return None


def own_guards(gm: torch.fx.GraphModule) -> None:
    """Replace torch.export's ``_guards_fn`` module of ``gm`` by an :class:`ExportGuards` running the same code."""
    guards = gm._modules.get(_GUARDS)
    if guards is None or isinstance(guards, ExportGuards):
        return
    fn = _guard_function(getattr(guards, "forward", None))
    if fn is not None:
        setattr(gm, _GUARDS, ExportGuards(marshal.dumps(fn.__code__)))


_MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """Names of the submodules whose forward depends on ``training`` (dropout, batch norm, ...)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _MODE_TYPES) or (isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and m.dropout > 0):
            out.append(name or type(m).__name__)
    return out


def warn_mode(class_name: str, captured_training: bool, modules: list[str], mode: bool | None = None) -> None:
    """Warn that an export capture keeps the train/eval behaviour it was captured with.

    ``mode=None``: at capture (warns for a training-mode capture); else on ``train(mode)`` asking for
    the other mode.
    """
    if not modules or (mode is None and not captured_training) or (mode is not None and mode == captured_training):
        return
    captured = "training" if captured_training else "eval"
    listed = ", ".join(modules[:4]) + (" …" if len(modules) > 4 else "")
    if mode is None:
        what = (
            f"torch.export captured {class_name} in training mode: dropout / batch norm ({listed}) are traced "
            "in training mode and stay so; sgm.eval() cannot switch them."
        )
    else:
        what = (
            f"{'train' if mode else 'eval'}() on a {class_name} captured by torch.export in {captured} mode: "
            f"dropout / batch norm ({listed}) keep their {captured}-mode behaviour in the graph."
        )
    warnings.warn(
        what + " Capture in the mode you will run it in (model.eval() before fxs.sparsify_graph for calibration "
        "and inference), or use capture='fx', whose graph follows train() / eval().",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


#: torch's pytree warns when the tree specs of an export capture's codegen are deep-copied (torch's own
#: deprecated isinstance check inside copyreg, not a call of ours or of the user's)
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def quiet_deepcopy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy`` without torch's ``LeafSpec`` FutureWarning (copying an export capture's graph)."""
    import copy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
        return copy.deepcopy(obj, memo)
