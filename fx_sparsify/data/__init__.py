"""The data sparsifier: masks for tensors, parameters and embeddings that live outside a traced model.

The API of ``torch.ao.pruning._experimental.data_sparsifier`` / ``data_scheduler``.
"""

from __future__ import annotations

from .base_data_sparsifier import EMBEDDING_TYPES, SUPPORTED_TYPES, BaseDataSparsifier, DataNameError
from .data_norm_sparsifier import DataNormSparsifier
from .data_sparsifier import DataSparsifier
from .scheduler import BaseDataScheduler, LambdaDataScheduler

__all__ = [
    "BaseDataScheduler",
    "BaseDataSparsifier",
    "DataNameError",
    "DataNormSparsifier",
    "DataSparsifier",
    "EMBEDDING_TYPES",
    "LambdaDataScheduler",
    "SUPPORTED_TYPES",
]
