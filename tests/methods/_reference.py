"""Reference masks from torch.nn.utils.prune and torch.ao.pruning, computed on the same tensors."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

__all__ = ["wns_mask", "tie_free"]


def wns_mask(
    weight: torch.Tensor,
    *,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int],
    zeros_per_block: int | None,
    norm: int = 2,
) -> torch.Tensor:
    """The mask WeightNormSparsifier.step() gives a Linear whose weight is ``weight`` (2-D)."""
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    sparsifier = WeightNormSparsifier(
        sparsity_level=sparsity_level,
        sparse_block_shape=sparse_block_shape,
        zeros_per_block=zeros_per_block,
        norm=norm,
    )
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    return model[0].parametrizations.weight[0].mask.detach().bool().clone()


def tie_free(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distinct magnitudes (a random permutation of 1..n, random signs): no ties for any score."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    values = (torch.randperm(n, generator=g) + 1).to(torch.float64) / n
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (values * signs).reshape(shape).to(dtype)
