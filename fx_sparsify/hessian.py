"""``HessianObserver``: the identity node that accumulates ``X·Xᵀ`` of a Linear layer's input (SparseGPT).

Every calibration forward folds its input ``x`` (``(..., in_features)``, flattened to rows) into
``stat += xᵀ·x`` in ``float32`` (or ``float64``; for a ``Conv2d`` the rows are its input patches,
``F.unfold`` with the layer's kernel, dilation, padding and stride); :meth:`HessianObserver.reduced` returns
``H = 2·X·Xᵀ / rows``. It is an :class:`~fx_sparsify.observer.ActivationObserver` with aggregate
``"sum"``, so it is disabled, reset, pickled and all-reduced under DDP like every observer. One
``in × in`` statistic per observer; layers that read the same input (``q``, ``k``, ``v``) share one.

With ``augment=True`` each row gets a constant 1 appended before it is folded in, so the statistic is
``Σ [x, 1]ᵀ·[x, 1]`` (``(in + 1) × (in + 1)``): its last column holds the sum of the rows and its last
entry their count, the mean and the second moment in one summable tensor (channel importance and the
consumer refit of ``channels`` rules, SPEC §17).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .observer import ActivationObserver

__all__ = ["HessianObserver"]


class HessianObserver(ActivationObserver):
    """Identity on its input; accumulates ``xᵀ·x`` over the rows of every batch while ``enabled``."""

    augment = False  # class default: observers pickled before the option existed load unaugmented

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        name: str = "",
        unfold: dict[str, Any] | None = None,
        augment: bool = False,
    ) -> None:
        super().__init__("sum", "sum", name=name)
        self.augment = augment
        self.compact, self._fast = True, False
        self.dtype = dtype
        self.unfold = unfold  # a Conv2d's kernel_size, dilation, padding, stride: rows are its input patches

    def rows(self, x: Tensor) -> Tensor:
        """The rows of ``x`` this observer folds in (unfolded patches for a conv; a 1 appended with ``augment``)."""
        if self.unfold is not None:  # (N, C, H, W) -> one row of C·kh·kw per output position
            patches = F.unfold(x if x.dim() == 4 else x.unsqueeze(0), **self.unfold)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        rows = rows.to(self.dtype)
        if self.augment:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        return rows

    def _observe(self, x: Tensor) -> None:
        attrs = self.__dict__
        attrs["input_shape"] = x.shape
        rows = self.rows(x)
        stat: Tensor = self._buffers["stat"]  # type: ignore[assignment]  # set in __init__
        if self.batches and stat.dtype != self.dtype:  # the module was cast (.half()): accumulate in our dtype
            stat = self.stat = stat.to(self.dtype)
        if not self.batches:
            self.stat = rows.T @ rows
        elif stat.is_inference() and not torch.is_inference_mode_enabled():
            self.stat = torch.addmm(stat, rows.T, rows)
        else:
            stat.addmm_(rows.T, rows)
        attrs["samples"] += rows.shape[0]
        attrs["batches"] += 1

    def reduced(self) -> list[Tensor]:
        """``[H]`` with ``H = 2·X·Xᵀ / rows`` over every row seen since the last step."""
        if self.batches == 0:
            raise ValueError(f"observer {self.name!r} has seen no data since the last step; run forward passes first")
        return [self.stat * (2.0 / max(self.samples, 1))]

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, augment={self.augment}, batches={int(self.batches)}, rows={int(self.samples)}"
