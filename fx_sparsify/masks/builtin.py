"""Built-in mask methods, registered exactly the way a user registers one."""

from __future__ import annotations

import torch
from torch import Tensor

from ._registry import register_mask_method
from ._selectors import count_to_prune, prune_smallest

__all__: list[str] = []


@register_mask_method("l1_unstructured")
def l1_unstructured(tensor: Tensor, *, sparsity: float | int) -> Tensor:
    """Prune the entries of smallest |x| (exact count, as torch.nn.utils.prune.L1Unstructured)."""
    return prune_smallest(tensor.abs(), count_to_prune(sparsity, tensor.numel()))


@register_mask_method("dense")
def dense(tensor: Tensor) -> Tensor:
    """Keep everything."""
    return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
