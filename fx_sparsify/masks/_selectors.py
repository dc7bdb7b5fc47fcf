"""Shared, vectorised selectors. Scores are computed by the methods; these pick what to keep."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["count_to_prune", "prune_smallest"]


def count_to_prune(amount: float | int, n: int, *, what: str = "sparsity") -> int:
    """How many of ``n`` units to prune: a float in [0, 1] is rounded half-to-even, an int is a count."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{what} must be a float in [0, 1] or an int count, got {type(amount).__name__}: {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0 or amount > n:
            raise ValueError(f"{what}={amount} is a count of units to prune; it must be in [0, {n}] for this tensor")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"{what}={amount} is a fraction; it must be in [0, 1] (or pass an int count)")
    return round(float(amount) * n)


def prune_smallest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask of ``scores``' shape pruning exactly the ``k`` smallest entries (ties broken by topk)."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        flat = scores.reshape(-1)
        if not flat.dtype.is_floating_point or flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        idx = torch.topk(flat, k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = False
    return mask
