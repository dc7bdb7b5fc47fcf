"""Wanda's selection (Sun et al., 2023): ``|W|·‖X‖`` scores compared within each output row.

``"scores": "wanda"`` ranks a Linear weight by ``|W_ij| · ‖X_j‖`` (the norm of input feature ``j`` over
the calibration data). As in the paper, entries compete only with the other entries of their output
row: ``l1_unstructured`` / ``topk`` prune the same fraction of every row. N:M (``nm``) already compares
within groups of a row; other methods (``block``, ``ln_structured``, ...) rank the whole tensor as usual.

    >>> import torch
    >>> per_row_mask("l1_unstructured", torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, 8.0, 7.0, 6.0]]), {"sparsity": 0.5})
    tensor([[False, False,  True,  True],
            [ True,  True, False, False]])
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

from torch import Tensor

from .._threads import serial_when_small
from ._selectors import count_to_prune, prune_smallest_in_groups

__all__ = ["PER_ROW", "per_row_mask"]

PER_ROW = frozenset({"l1_unstructured", "topk"})  # methods whose whole-tensor count becomes a per-row count


def _per_row_count(amount: float | int, rows: int, cols: int, what: str) -> int:
    if isinstance(amount, numbers.Integral) and not isinstance(amount, bool):
        if amount % rows:
            raise ValueError(
                f"'scores': 'wanda' prunes the same number of entries in each of the {rows} output rows; "
                f"{what}={amount} is not a multiple of {rows}. Pass a fraction, or a multiple of {rows}"
            )
        return count_to_prune(int(amount) // rows, cols, what=what)
    return count_to_prune(amount, cols, what=what)


@serial_when_small
def per_row_mask(method: str, scores: Tensor, options: Mapping[str, Any]) -> Tensor:
    """Keep-mask pruning the same count in every row of 2-D ``scores`` (``method`` in :data:`PER_ROW`)."""
    assert method in PER_ROW and scores.dim() == 2, (method, tuple(scores.shape))
    rows, cols = scores.shape
    if options.get("density") is not None:
        k = cols - _per_row_count(options["density"], rows, cols, "density")
    else:
        k = _per_row_count(options["sparsity"], rows, cols, "sparsity")
    return prune_smallest_in_groups(scores.abs() if method == "l1_unstructured" else scores, k)
