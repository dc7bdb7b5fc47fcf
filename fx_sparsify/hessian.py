"""``HessianObserver``: the identity node that accumulates ``X·Xᵀ`` of a Linear layer's input (SparseGPT).

Every calibration forward folds its input ``x`` (``(..., in_features)``, flattened to rows) into
``stat += xᵀ·x`` (for a ``Conv2d`` the rows are its input patches, ``F.unfold`` with the layer's kernel,
dilation, padding and stride). Each batch's product is computed in the observer's ``dtype`` (``float32``,
or ``float64``), and the **sum over the batches is kept in float64** (:data:`SUM_DTYPE`), then rounded
once to ``dtype`` when a solve reads it (:meth:`HessianObserver.hessian`). So the statistic does not
depend on the order in which the batches were added: several ranks, each summing its own batches and then
all-reducing the sums (SPEC §19), give the float32 Hessian of one process that saw every batch (float64
sums of float32 products round at 2⁻⁵³, far below a float32 step: the rounded results agree unless a sum
lies that close to a float32 rounding boundary). The float64 sum takes ``in² × 8`` bytes while batches
are added; the product is added a slice of rows at a time, so no second ``in × in`` tensor is made.
:meth:`HessianObserver.reduced` returns ``H = 2·X·Xᵀ / rows``. It is an
:class:`~fx_sparsify.observer.ActivationObserver` with aggregate ``"sum"``, so it is disabled, reset,
pickled and all-reduced under DDP like every observer. One ``in × in`` statistic per observer; layers
that read the same input (``q``, ``k``, ``v``) share one.

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

__all__ = ["HessianObserver", "SUM_DTYPE", "add_product"]

SUM_DTYPE = torch.float64  # the sums over batches (and ranks); rounded to the observer's dtype when read
_SLICE_BYTES = 4 << 20  # the product is added this many bytes of rows at a time (no second in × in tensor)


def add_product(total: Tensor, left: Tensor, right: Tensor) -> None:
    """``total += leftᵀ·right`` in place; the product in ``left``'s dtype, a slice of ``total``'s rows at a time.

    ``total`` may be wider than the product (float64 sums of float32 products): each slice's product is
    made in the inputs' dtype and added, so the temporary is a few MiB, not another ``total``.
    """
    step = max(1, _SLICE_BYTES // max(1, right.shape[1] * right.element_size()))
    for start in range(0, left.shape[1], step):
        part = left[:, start : start + step]
        total[start : start + part.shape[1]].add_(part.T @ right)


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
        if not self.batches:
            stat = self.stat = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=SUM_DTYPE)
        elif stat.dtype != SUM_DTYPE or (stat.is_inference() and not torch.is_inference_mode_enabled()):
            # read (rounded) or cast (.half()) since; or begun under inference_mode, where it cannot grow in place
            stat = self.stat = stat.to(SUM_DTYPE, copy=True)
        add_product(stat, rows, rows)
        attrs["samples"] += rows.shape[0]
        attrs["batches"] += 1

    def hessian(self) -> Tensor:
        """``Σ xᵀ·x`` in the observer's ``dtype``: the float64 sum rounded once, in place (the sum is dropped).

        Further batches widen it again. Call it after the statistics are all-reduced (``step()`` does).
        """
        stat: Tensor = self._buffers["stat"]  # type: ignore[assignment]  # set in __init__
        if stat.dtype != self.dtype and stat.is_floating_point():
            stat = self.stat = stat.to(self.dtype)
        return stat

    def reduced(self) -> list[Tensor]:
        """``[H]`` with ``H = 2·X·Xᵀ / rows`` over every row seen since the last step."""
        if self.batches == 0:
            raise ValueError(f"observer {self.name!r} has seen no data since the last step; run forward passes first")
        return [self.hessian() * (2.0 / max(self.samples, 1))]

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, augment={self.augment}, batches={int(self.batches)}, rows={int(self.samples)}"
