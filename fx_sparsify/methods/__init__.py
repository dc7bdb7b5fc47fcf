"""Mask methods: the registry, shorthand parsing and the built-in methods."""

from __future__ import annotations

from . import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from . import sparsegpt as _sparsegpt  # noqa: F401  (registers "sparsegpt")
from ._global import global_masks
from ._random import generator_for
from ._registry import (
    MaskMethod,
    available_mask_methods,
    compute_mask,
    get_mask_method,
    keep_mask,
    register_mask_method,
    validate_options,
)
from ._selectors import count_to_prune, refuse_nan
from ._shorthand import ParsedMethod, format_method, parse_method
from .builtin import PACKED_METHODS

__all__ = [
    "PACKED_METHODS",
    "MaskMethod",
    "ParsedMethod",
    "available_mask_methods",
    "compute_mask",
    "count_to_prune",
    "format_method",
    "generator_for",
    "get_mask_method",
    "global_masks",
    "keep_mask",
    "parse_method",
    "refuse_nan",
    "register_mask_method",
    "validate_options",
]
