"""A layer that holds its weight in another layout still saves and loads it dense under ``weight``.

Mixed into :class:`~fx_sparsify._bitmask.BitmaskLinear` and
:class:`~fx_sparsify.passes._sparse_linear.SparseLinear`: the host provides ``dense_weight()``, the
``weight_shape`` tuple, ``values`` (for the dtype and device) and ``_store(dense)``, which packs a dense
weight into its layout. ``state_dict()`` then holds the original key and shape, and
``load_state_dict`` takes a dense (or any torch sparse) weight and packs it again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DenseWeightState"]


class DenseWeightState:
    """``_save_to_state_dict`` / ``_load_from_state_dict`` for a weight kept in a packed layout."""

    weight_shape: tuple[int, ...]
    values: Tensor

    def dense_weight(self) -> Tensor:
        raise NotImplementedError

    def _store(self, dense: Tensor) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            incoming = state_dict[key]
            if tuple(incoming.shape) != self.weight_shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(incoming.shape)} "
                    f"from checkpoint, the shape in current model is {self.weight_shape}."
                )
            else:
                dense = incoming.to_dense() if incoming.layout != torch.strided else incoming
                with torch.no_grad():
                    self._store(dense.to(self.values))
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
