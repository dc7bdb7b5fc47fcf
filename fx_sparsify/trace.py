"""Capture: turn a model into a ``torch.fx.GraphModule`` (SPEC §2).

``capture="fx"`` uses symbolic tracing with the layers that the passes rewrite (``Linear``, ``Conv*``,
``ConvTranspose*``, ``Embedding``, ``EmbeddingBag``) kept as module calls. ``capture="export"`` uses
``torch.export.export(...).module()``: an aten-level graph in which every parameter is a ``get_attr``
under its original name. ``capture="auto"`` tries fx first and falls back to export when tracing fails
and example inputs were given.

The stock ``torch.fx.Tracer`` scans every parameter of the root on each parameter access, which is
quadratic in model size; :class:`SparsityTracer` looks parameters up in a dict built once.

:func:`pausing_gc` pauses Python's cyclic garbage collector for a capture and its passes: the capture
allocates many long-lived objects (nodes, generated code, the copied modules), which trigger full
collections that walk every tracked object of the process, the user's model included, so that a
capture of 3000 layers paid two of them and one of 1000 layers none (time growing faster than the
graph). Cycles the capture drops are freed by the next automatic collection. ``torch.export`` runs with
the collector on (its fake tensors leave many short-lived cycles).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import inspect
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.fx
from torch import nn

from ._export_capture import mode_dependent_modules, own_guards, warn_mode
from ._modules import attach_tensor

__all__ = ["CaptureError", "Captured", "SparsityTracer", "capture_graph", "LEAF_TYPES", "pausing_gc", "gc_running"]

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
_GC_PAUSED = [0]  # depth of pausing_gc calls that turned the collector off


def pausing_gc(fn: _F) -> _F:
    """Run ``fn`` with the cyclic garbage collector paused (its previous state restored, even on error)."""

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():  # already off (the caller's choice, or an outer pausing_gc): leave it so
            return fn(*args, **kwargs)
        gc.disable()
        _GC_PAUSED[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _GC_PAUSED[0] -= 1
            gc.enable()

    return paused  # type: ignore[return-value]


@contextlib.contextmanager
def gc_running() -> Iterator[None]:
    """Turn the collector back on inside :func:`pausing_gc` (for ``torch.export``), off again after."""
    if _GC_PAUSED[0] == 0 or gc.isenabled():
        yield
        return
    gc.enable()
    try:
        yield
    finally:
        gc.disable()


#: Layers kept as module calls by the fx capture: the weight pass rewrites them into functional calls.
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)


class CaptureError(ValueError):
    """The model could not be captured as a graph; the message names where and the ways out."""


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    capture: str  # "fx" or "export"


class SparsityTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps ``LEAF_TYPES`` (and user leaves) as calls and stays linear."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = LEAF_TYPES + tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {n for n in leaves if isinstance(n, str)}
        self._param_names: dict[int, str] = {}
        self._buffer_names: dict[int, str] = {}
        self.module_stack_names: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose call raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        if isinstance(root, nn.Module):
            self._param_names = {id(p): n for n, p in root.named_parameters()}
            self._buffer_names = {id(b): n for n, b in root.named_buffers()}
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.module_stack_names.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.module_stack_names[-1]
            raise
        finally:
            self.module_stack_names.pop()

    def _proxy_for(self, attr_val: Any, cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, nn.Parameter):
            name = self._param_names.get(id(attr_val))
        elif self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            name = self._buffer_names.get(id(attr_val))
        else:
            name = None
        if name is None:
            return None
        if name not in cache:
            cache[name] = self.create_proxy("get_attr", name, (), {})
        return cache[name]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        proxy = self._proxy_for(attr_val, parameter_proxy_cache)
        return attr_val if proxy is None else proxy

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, nn.Parameter) and id(a) in self._param_names:
            return self.create_node("get_attr", self._param_names[id(a)], (), {})
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and id(a) in self._buffer_names:
            return self.create_node("get_attr", self._buffer_names[id(a)], (), {})
        return super().create_arg(a)


#: the installed package folders whose frames are ours or torch's, not the user's (a checkout folder
#: or a venv that merely has "fx_sparsify" or "torch" in its path is the user's)
_LIBRARY_DIRS: tuple[str, ...] = tuple(
    os.path.join(os.path.realpath(os.path.dirname(f)), "") for f in (__file__, torch.__file__) if f
)


def _is_library_frame(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_LIBRARY_DIRS)


def _user_frame(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame outside torch and fx_sparsify."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not _is_library_frame(frame.filename):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno} in {last.name}" if last else "<unknown location>"


def _check_tracing_options(model: nn.Module, concrete_args: dict[str, Any] | None, leaf_modules: list[Any]) -> None:
    """Misspelt ``leaf_modules`` / ``concrete_args`` would silently do nothing: refuse them."""
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            continue
        if not isinstance(leaf, str):
            raise TypeError(f"leaf_modules entries are module FQNs (str) or nn.Module classes, got {leaf!r}")
        try:
            model.get_submodule(leaf)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(leaf, names, n=5, cutoff=0.3)
            raise ValueError(
                f"leaf_modules: the model has no submodule {leaf!r}; closest: {', '.join(close) or '(none)'}"
            ) from None
    if concrete_args:
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in concrete_args if k not in params and not takes_kwargs]
        if unknown:
            raise ValueError(
                f"concrete_args: {type(model).__name__}.forward has no argument(s) {', '.join(map(repr, unknown))}; "
                f"its arguments are {', '.join(params) or '(none)'}"
            )


def _refuse_hooks(model: nn.Module, leaf_modules: list[Any]) -> None:
    """Symbolic tracing calls ``forward`` directly, so forward hooks would be dropped without a word."""
    opaque = [n for n in leaf_modules if isinstance(n, str)]
    for name, module in model.named_modules():
        if not (module._forward_hooks or module._forward_pre_hooks):
            continue
        user_leaf = any(name == o or name.startswith(o + ".") for o in opaque) or (
            isinstance(module, tuple(t for t in leaf_modules if isinstance(t, type)))
            and not isinstance(module, LEAF_TYPES)
        )
        if user_leaf:  # called as a module at run time: its hooks run
            continue
        label = f"module {name!r}" if name else "the root module"
        raise CaptureError(
            f"{label} ({type(module).__name__}) has forward hooks or pre-hooks (e.g. torch.nn.utils.weight_norm, "
            "pruning or logging hooks); torch.fx symbolic tracing would drop them and change the model's outputs.\n"
            "Ways out: pass example_inputs=(...) with capture='export' or 'auto' (torch.export runs the hooks into "
            "the graph); or remove the hooks first (e.g. torch.nn.utils.remove_weight_norm, "
            "torch.nn.utils.prune.remove)."
        )


def _trace_fx(
    model: nn.Module, concrete_args: dict[str, Any] | None, leaf_modules: Iterable[Any]
) -> torch.fx.GraphModule:
    leaf_modules = list(leaf_modules)
    _check_tracing_options(model, concrete_args, leaf_modules)
    _refuse_hooks(model, leaf_modules)
    tracer = SparsityTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:  # re-raised with the place it failed and the ways out
        where = tracer.failed_in or ""
        module = (
            f"module {where!r} ({type(model.get_submodule(where)).__name__})"
            if where
            else f"{type(model).__name__}.forward"
        )
        raise CaptureError(
            f"torch.fx symbolic tracing failed in {module} at {_user_frame(exc)}: {type(exc).__name__}: {exc}\n"
            "Ways out: pass example_inputs=(...) (and example_kwargs) with capture='export' or 'auto' to use "
            "torch.export; or keep that module opaque with leaf_modules=[...]; or fix data-dependent "
            "arguments with concrete_args={...}."
        ) from exc
    for node in graph.nodes:
        if isinstance(node.type, str):  # `from __future__ import annotations`: the codegen cannot import a string
            node.type = None
    return torch.fx.GraphModule(model, graph, model.__class__.__name__)


def _export(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None,
    example_kwargs: dict[str, Any] | None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    if example_inputs is None and example_kwargs is None:
        raise ValueError(
            "capture='export' needs example inputs: pass example_inputs=(tensor, ...) and/or example_kwargs={...}"
        )
    try:
        with gc_running():  # export's fake tensors leave many cycles: let the collector free them as they come
            ep = torch.export.export(
                model, tuple(example_inputs or ()), dict(example_kwargs or {}), dynamic_shapes=dynamic_shapes
            )
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} at {_user_frame(exc)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\nWays out: check that example_inputs match forward's "
            "signature; mark data-dependent code with torch._check; or try capture='fx' with leaf_modules=[...]."
            + (" For Hugging Face models pass use_cache=False in example_kwargs." if "Cache" in str(exc) else "")
        ) from exc
    with gc_running():
        gm = ep.module()
    own_guards(gm)  # a guard failure says dynamic_shapes; the module pickles
    warn_mode(type(model).__name__, model.training, mode_dependent_modules(model))
    return gm


def capture_graph(
    model: nn.Module,
    *,
    capture: str = "auto",
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[Any] | None = None,
    dynamic_shapes: Any = None,
) -> Captured:
    """Capture ``model`` as a GraphModule with the chosen strategy (the model is not copied here)."""
    if capture not in ("fx", "export", "auto"):
        raise ValueError(f"capture={capture!r}: use 'fx', 'export' or 'auto'")
    if isinstance(model, torch.fx.GraphModule) and capture != "export":
        return Captured(model, "fx")
    if capture == "export":
        return _carry_unread_state(
            model, Captured(_export(model, example_inputs, example_kwargs, dynamic_shapes), "export")
        )
    try:
        return _carry_unread_state(model, Captured(_trace_fx(model, concrete_args, leaf_modules or ()), "fx"))
    except CaptureError as err:
        if capture == "fx" or (example_inputs is None and example_kwargs is None):
            raise
        log.info("fx tracing failed, falling back to torch.export: %s", err)
        return _carry_unread_state(
            model, Captured(_export(model, example_inputs, example_kwargs, dynamic_shapes), "export")
        )


def _carry_unread_state(model: nn.Module, captured: Captured) -> Captured:
    """Carry over the tensors the graph never reads, so the captured module's ``state_dict`` has every key.

    A counter ``forward`` does not use (``register_buffer("calls", ...)``), or ``num_batches_tracked`` of a
    traced-through norm layer (timm's ``BatchNormAct2d``), is not in the graph, so the capture drops it.
    """
    gm = captured.gm
    present = {id(t) for t in gm.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    have = set(gm.state_dict().keys())
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in have and isinstance(value, torch.Tensor) and id(value) not in present:
            attach_tensor(gm, key, value)
    return captured
