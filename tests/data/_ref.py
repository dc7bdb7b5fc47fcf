"""Helpers to run the reference torch.ao.pruning data sparsifier on the same data."""

from __future__ import annotations

import warnings
from typing import Any

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.data_scheduler import BaseDataScheduler as RefBaseDataScheduler
    from torch.ao.pruning._experimental.data_sparsifier import BaseDataSparsifier as RefBaseDataSparsifier
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDataNormSparsifier

__all__ = ["RefBaseDataScheduler", "RefBaseDataSparsifier", "RefDataNormSparsifier", "ref_mask"]


def ref_mask(data: Any, **kwargs: Any) -> torch.Tensor:
    """The reference DataNormSparsifier's mask after one step, as bool of the data's shape."""
    sparsifier = RefDataNormSparsifier(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsifier.add_data("x", data)
        sparsifier.step()
    weight = data.weight if isinstance(data, torch.nn.Module) else data
    return sparsifier.get_mask("x").bool().reshape(weight.shape)
