"""Grep-able names for what the passes add, made unique against a module's attributes."""

from __future__ import annotations

import re

import torch

__all__ = ["mask_buffer_name", "unique_attr"]


def _flat(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def unique_attr(module: torch.nn.Module, base: str) -> str:
    """``base`` (dots and colons flattened) or ``base_1``, ``base_2`` … : a free root attribute name."""
    base = _flat(base)
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def mask_buffer_name(module: torch.nn.Module, target: str) -> str:
    """``fc1.weight`` → ``fc1_weight_mask``."""
    return unique_attr(module, f"{target}_mask")
