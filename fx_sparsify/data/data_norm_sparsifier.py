"""``DataNormSparsifier``: prune the blocks of smallest L1 / L2 norm (the reference's masks, fast).

Same constructor, config keys and masks as
``torch.ao.pruning._experimental.data_sparsifier.DataNormSparsifier``::

    >>> import torch, fx_sparsify.data as fxd
    >>> sparsifier = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    >>> _ = sparsifier.add_data("w", torch.tensor([[4.0, 3.0, 0.5, -0.1], [0.2, 0.3, 9.0, 8.0]]))
    >>> sparsifier.step()
    >>> sparsifier.get_mask("w")
    tensor([[ True,  True, False, False],
            [False, False,  True,  True]])

How it computes them: the block scores are the reference's own (``avg_pool2d(|x|)`` or of ``x*x``,
``ceil_mode=True``, so a ragged edge block is averaged over its in-bounds entries); the
``round(sparsity_level * n_blocks)`` smallest are picked by an exact k-selection instead of a full sort;
inside a pruned block, ``zeros_per_block`` entries of smallest ``|x|`` are pruned with the ``block``
mask method. Rows are processed in chunks, so the extra memory is a small fraction of the data's.

Masks equal the reference's on the same data, with one exception: among blocks whose scores tie
*exactly* at the threshold, the reference's choice comes from an unstable ``torch.sort`` (unspecified,
and different between CPU builds); here the lower block index is pruned first (likewise, inside a
pruned block of more than 16 entries, among exactly tied entries). On random float data
that affects a handful of the 16M blocks of an ``EmbeddingBag(1_000_000, 64)``.
``tie_break="reference"`` sorts as the reference does, for bit-identical masks (about 4x slower).

Unlike the reference, masks keep the data's shape (1-D data gets a 1-D mask, not ``(1, n)``) and
``torch.bool`` dtype, and bad configs raise at ``add_data`` time.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import compute_mask
from ..methods._selectors import refuse_nan
from .base_data_sparsifier import BaseDataSparsifier

__all__ = ["DataNormSparsifier"]

_KEYS = ("sparsity_level", "sparse_block_shape", "zeros_per_block")
_NORM_P = {"L1": 1, "L2": 2}
_TIE_BREAKS = ("index", "reference")
# Rows (times the block width) processed at once: bounds the temporaries to ~4M entries.
_CHUNK_ENTRIES = 1 << 22


def _block_shape(value: object) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and int(b) >= 1 for b in value)
    ):
        raise ValueError(f"sparse_block_shape must be a pair of positive ints such as (1, 4), got {value!r}")
    return (int(value[0]), int(value[1]))


def _check_values(config: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in config if k not in _KEYS]
    if unknown:
        hints = "; ".join(
            f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, _KEYS, n=1)) else "")
            for k in unknown
        )
        raise TypeError(f"DataNormSparsifier got unknown config key {hints}; it accepts: {', '.join(_KEYS)}")
    level = config["sparsity_level"]
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(f"sparsity_level must be a number in [0, 1], got {type(level).__name__}: {level!r}")
    if not 0.0 <= float(level) <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity_level={level!r} is the fraction of blocks to prune; it must be in [0, 1]")
    block = _block_shape(config["sparse_block_shape"])
    zeros = config["zeros_per_block"]
    if isinstance(zeros, bool) or not isinstance(zeros, numbers.Integral):
        raise TypeError(f"zeros_per_block must be an int, got {type(zeros).__name__}: {zeros!r}")
    if not 0 <= int(zeros) <= block[0] * block[1]:
        raise ValueError(
            f"zeros_per_block={zeros} must be in [0, {block[0] * block[1]}] for sparse_block_shape={block} "
            "(the number of entries zeroed in a pruned block)"
        )
    return {**config, "sparse_block_shape": block}


def _as_2d(t: Tensor) -> Tensor:
    """The reference's view of data: squeezed, 1-D (or 0-D) as one row."""
    s = t.squeeze()
    return s.reshape(1, -1) if s.dim() < 2 else s


def _row_chunks(height: int, width: int, block_h: int) -> Iterable[tuple[int, int]]:
    rows = max(block_h, (_CHUNK_ENTRIES // max(width, 1)) // block_h * block_h)
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


class DataNormSparsifier(BaseDataSparsifier):
    r"""Prune the ``sparsity_level`` fraction of ``sparse_block_shape`` blocks with the smallest norm.

    Args:
        data_list: optional ``(name, data)`` pairs.
        sparsity_level: fraction of blocks to prune, in [0, 1]; ``round(level * n_blocks)`` blocks.
        sparse_block_shape: ``(height, width)`` of a block; blocks start at index 0, edge blocks
            may be ragged.
        zeros_per_block: entries zeroed inside a pruned block (the smallest ``|x|``); default: all.
        norm: ``"L1"`` (mean ``|x|`` over the block) or ``"L2"`` (mean ``x*x``).
        tie_break: ``"index"`` (default: exactly tied blocks at the threshold prune the lower index
            first) or ``"reference"`` (``torch.sort``'s order, as the reference; slower).

    The first three are defaults that ``add_data(name, data, **config)`` may override per data.
    Data must be floating point and at most 2-D after squeezing size-1 dims (as the reference).
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
        *,
        tie_break: str = "index",
    ) -> None:
        if norm not in _NORM_P:
            raise ValueError(f"norm must be 'L1' or 'L2', got {norm!r}")
        if tie_break not in _TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {_TIE_BREAKS}, got {tie_break!r}")
        block = _block_shape(sparse_block_shape)
        if zeros_per_block is None:
            zeros_per_block = block[0] * block[1]
        defaults = {
            "sparsity_level": sparsity_level,
            "sparse_block_shape": sparse_block_shape,
            "zeros_per_block": zeros_per_block,
        }
        _check_values(dict(defaults))
        self.norm = norm
        self.tie_break = tie_break
        super().__init__(data_list=data_list, **defaults)

    def _check_config(self, name: str, data: Tensor, config: dict[str, Any]) -> dict[str, Any]:
        config = _check_values(config)
        if not data.is_floating_point():
            raise TypeError(
                f"DataNormSparsifier ranks blocks by their norm and needs floating-point data; {name!r} has "
                f"dtype {data.dtype} (convert it with .float())"
            )
        if data.squeeze().dim() > 2:
            raise ValueError(
                f"DataNormSparsifier supports data that is at most 2-D after squeezing size-1 dims; "
                f"{name!r} has shape {tuple(data.shape)}. Reshape it (e.g. data.flatten(1)) or use "
                "DataSparsifier(method='block', block_shape=...) for N-D blocks"
            )
        return config

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: Tensor,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int,
        **kwargs: Any,
    ) -> None:
        refuse_nan(data, "the data")  # the NaN rule of every mask method (a NaN has no rank)
        mask = self.get_mask(name)
        x = _as_2d(data)
        out = _as_2d(mask)  # a view: the mask is written in place, chunk by chunk
        height, width = x.shape
        bh, bw = sparse_block_shape
        grid_h, grid_w = -(-height // bh), -(-width // bw)
        n_blocks = grid_h * grid_w
        k = round(float(sparsity_level) * n_blocks)
        if k == 0 or zeros_per_block == 0 or x.numel() == 0:
            mask.fill_(True)
            return
        keep_blocks = self._keep_blocks(x, k, n_blocks, (bh, bw), (grid_h, grid_w))
        if zeros_per_block == bh * bw and height % bh == 0 and width % bw == 0:
            out.view(grid_h, bh, grid_w, bw).copy_(keep_blocks[:, None, :, None])
            return
        for r0, r1 in _row_chunks(height, width, bh):
            kb = keep_blocks[r0 // bh : -(-r1 // bh)]
            keep = kb[:, None, :, None].expand(-1, bh, -1, bw).reshape(kb.shape[0] * bh, grid_w * bw)
            keep = keep[: r1 - r0, :width]
            if zeros_per_block < bh * bw:
                keep = keep | self._within_blocks(x[r0:r1], (bh, bw), zeros_per_block)
            out[r0:r1].copy_(keep)

    def _keep_blocks(self, x: Tensor, k: int, n_blocks: int, block: tuple[int, int], grid: tuple[int, int]) -> Tensor:
        """``(grid_h, grid_w)`` bool: False for the ``k`` blocks of smallest mean norm."""
        if k >= n_blocks:
            return torch.zeros(grid, dtype=torch.bool, device=x.device)
        height, width = x.shape
        bh, bw = block
        scores = torch.empty(grid, dtype=x.dtype, device=x.device)
        # avg_pool2d sums a window row by row, left to right, then divides by its in-bounds size. For
        # whole blocks of float32/64 the same adds in the same order give bit-identical scores, 2-3x faster.
        fast = height % bh == 0 and width % bw == 0 and bh * bw <= 64 and x.dtype in (torch.float32, torch.float64)
        for r0, r1 in _row_chunks(height, width, bh):
            chunk = x[r0:r1].abs() if self.norm == "L1" else x[r0:r1] * x[r0:r1]
            dest = scores[r0 // bh : -(-r1 // bh)]
            if fast:
                view = chunk.view(dest.shape[0], bh, dest.shape[1], bw)
                dest.copy_(view[:, 0, :, 0])
                for i in range(bh):
                    for j in range(bw):
                        if i or j:
                            dest.add_(view[:, i, :, j])
                dest.div_(bh * bw)
            else:
                dest.copy_(F.avg_pool2d(chunk[None, None], kernel_size=block, stride=block, ceil_mode=True)[0, 0])
        if self.tie_break == "reference":
            keep = torch.ones(n_blocks, dtype=torch.bool, device=x.device)
            keep[torch.sort(scores.reshape(-1)).indices[:k]] = False
            return keep.view(grid)
        return compute_mask("l1_unstructured", scores, sparsity=k)

    def _within_blocks(self, x: Tensor, block: tuple[int, int], zeros: int) -> Tensor:
        """Keep-mask pruning the ``zeros`` smallest ``|x|`` of every block (padding never chosen)."""
        bh, bw = block
        if self.tie_break == "reference" and bh * bw > 16:
            # torch.sort along a dim of more than 16 entries is unstable: reproduce the reference's call.
            h, w = x.shape
            dh, dw = (-h) % bh, (-w) % bw
            norm = x.abs() if self.norm == "L1" else x * x
            padded = F.pad(norm, (0, dw, 0, dh), value=math.nan)
            cols = F.unfold(padded[None, None], kernel_size=block, stride=block)
            idx = torch.sort(cols, dim=1).indices[:, :zeros, :]
            keep = torch.ones_like(cols).scatter_(1, idx, 0.0)
            keep = F.fold(keep, output_size=padded.shape, kernel_size=block, stride=block)
            return keep[0, 0, :h, :w] != 0
        return compute_mask(
            "block",
            x,
            sparsity=-(-x.shape[0] // bh) * -(-x.shape[1] // bw),
            block_shape=block,
            zeros_per_block=zeros,
            p=_NORM_P[self.norm],
        )
