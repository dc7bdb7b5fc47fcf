"""Small helpers on module trees."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["attach", "attach_tensor", "find_tensor"]


def find_tensor(root: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter or buffer at ``path`` in ``root``, or None."""
    for getter in (root.get_parameter, root.get_buffer):
        try:
            return getter(path)
        except AttributeError:
            continue
    return None


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds ``path``'s last part, and that part; empty modules are made for missing ones on
    the way."""
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module, leaf


def attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Add ``module`` at ``path`` (nothing for the empty path), creating empty parent modules."""
    parent, leaf = _parent_of(root, path)
    if leaf:
        parent.add_module(leaf, module)


def attach_tensor(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Register ``value`` at ``path`` (a parameter stays a parameter), creating empty parent modules."""
    module, leaf = _parent_of(root, path)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)
