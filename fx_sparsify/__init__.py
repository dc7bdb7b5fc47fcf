"""fx_sparsify: a graph-level sparsification compiler for PyTorch."""

from __future__ import annotations

from .masks import available_mask_methods, compute_mask, register_mask_method

__all__ = ["available_mask_methods", "compute_mask", "register_mask_method"]
