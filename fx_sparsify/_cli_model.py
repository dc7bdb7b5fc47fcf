"""The command line's model and messages: the user-error type, the factory named by ``--model`` and the
progress lines, shared by ``fx-sparsify run`` (:mod:`fx_sparsify._cli_run`) and its streamed form
(:mod:`fx_sparsify._cli_stream`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

__all__ = ["Batch", "UserError", "build_model", "load_factory", "say"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]


class UserError(Exception):
    """A mistake in the command line or its files: exit status 2 with the message on stderr."""


def load_factory(ref: str) -> Callable[..., Any]:
    """``pkg.module:factory`` or ``path/to/file.py:factory`` → the callable."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise UserError(
            f"--model {ref!r}: expected PKG.MODULE:FACTORY (e.g. torchvision.models:resnet18) "
            "or path/to/file.py:FACTORY"
        )
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise UserError(f"--model {ref!r}: file {module_ref!r} does not exist")
        name = f"_fx_sparsify_model_{path.stem}"  # never shadows an importable module of the same name
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the defining module up
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: modules in the working directory
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_ref)
        except ModuleNotFoundError as err:
            raise UserError(
                f"--model {ref!r}: cannot import {module_ref!r} ({err}); check the module path "
                "and that its package is installed, or give path/to/file.py:FACTORY"
            ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(
            f"--model {ref!r}: {module_ref} has no callable {attr!r}; callables there: "
            f"{', '.join(names[:12]) or '(none)'}"
        )
    return factory  # type: ignore[no-any-return]


def build_model(ref: str, kwargs_json: str | None) -> nn.Module:
    kwargs: Any = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as err:
            raise UserError(
                f"--model-kwargs: not valid JSON ({err.msg} at column {err.colno}): {kwargs_json!r}"
            ) from None
        except (ValueError, RecursionError) as err:  # an integer past Python's digit limit, nesting too deep
            raise UserError(f"--model-kwargs: not usable JSON ({str(err)[:120]}): {kwargs_json[:80]!r}") from None
        if not isinstance(kwargs, dict):
            raise UserError(
                f"--model-kwargs: expected a JSON object such as '{{\"num_classes\": 10}}', got {kwargs_json!r}"
            )
    factory = load_factory(ref)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise UserError(f"--model {ref!r}: calling the factory with {kwargs} failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {ref!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)
