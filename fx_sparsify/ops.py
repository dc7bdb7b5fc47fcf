"""The functions that fx_sparsify's graph nodes call. Squash removes every one of them.

``apply_mask(weight, mask)`` is the one mask node of a weight. In eval mode under ``torch.no_grad`` /
``torch.inference_mode`` it returns a cached ``weight * mask`` that is recomputed only when the
weight or the mask changed (their version counters, storage or dtype), so an unsquashed model runs
eval forwards at plain speed. An in-place change made through ``.data`` bypasses the version counter:
``sgm.eval()`` drops the cache. In training mode, or with autograd on, it multiplies every call.
The cache is bounded (:func:`set_cache_limit`, default 256 MiB for all sparse modules together), so it
never silently doubles a large model: weights past the bound are multiplied on every call, and
``squash()`` frees the cache before it allocates. With ``"mode": "inplace"`` there is nothing to cache.

Embedding lookups with autograd on mask the gathered rows instead of the table:
``embedding(x, W) * embedding(x, M)`` (no full-table multiply per lookup). With autograd off they look
up in the same cached masked table as ``apply_mask`` (plain lookup speed, one table-sized copy).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _native
from ._masks import masked_copy

__all__ = [
    "apply_mask",
    "apply_mask_ste",
    "mask_activation",
    "embedding_masked",
    "embedding_bag_masked",
    "module_call",
    "conv_padded",
    "OPS",
    "set_cache_limit",
    "cache_limit",
    "cached_bytes",
    "drop_cache",
    "DEFAULT_CACHE_LIMIT",
]

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask -> (key, weight * mask, its finalizer)
_CACHED_BYTES = [0]  # what _CACHE holds, kept as entries come and go (a mask's death included)
#: guards _CACHE's entries and _CACHED_BYTES (reentrant: a mask's finalizer may run while its thread holds it)
_LOCK = threading.RLock()
_CACHEABLE = "_fxs_cacheable"  # attribute set on a mask buffer while its module is in eval mode
#: default bound of the eval cache, all sparse modules together (see :func:`set_cache_limit`)
DEFAULT_CACHE_LIMIT = 1 << 28
_LIMIT: list[int | None] = [DEFAULT_CACHE_LIMIT]


def set_cache_limit(nbytes: int | None) -> int | None:
    """Bound the eval cache of masked weights to ``nbytes`` (all sparse modules together); returns the old bound.

    An unsquashed sparse module in eval mode under ``torch.no_grad`` caches each ``weight * mask`` so
    that eval forwards run at plain speed; each cached weight costs its own size in memory. A weight is
    cached when the forward reaches it and it fits within the bound; the others are multiplied on
    every call (slower, no memory held). ``0`` turns the cache off, ``None``
    lifts the bound (the cache may then hold a second copy of every masked weight). Default: 256 MiB.
    Changing the bound drops what is cached.
    """
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"set_cache_limit: expected a byte count >= 0 or None (no bound), got {nbytes!r}")
    old = _LIMIT[0]
    _LIMIT[0] = nbytes
    drop_cache(list(_CACHE.keys()))
    return old


def cache_limit() -> int | None:
    """The current bound of the eval cache in bytes (``None``: unbounded)."""
    return _LIMIT[0]


def cached_bytes() -> int:
    """Bytes the eval cache holds now, all sparse modules together."""
    return _CACHED_BYTES[0]


def drop_cache(masks: list[Tensor]) -> None:
    """Free the cached ``weight * mask`` of these masks (it is recomputed when next needed)."""
    with _LOCK:
        for mask in masks:
            entry = _CACHE.pop(mask, None)
            if entry is not None and entry[2].detach() is not None:  # not already released by the mask's death
                _CACHED_BYTES[0] -= entry[1].nbytes


def _release(nbytes: int) -> None:
    with _LOCK:
        _CACHED_BYTES[0] -= nbytes


def set_cacheable(masks: list[Tensor], cacheable: bool) -> None:
    """Allow (eval mode) or forbid (training mode) the no-grad cache for these masks; drop what is cached."""
    for mask in masks:
        setattr(mask, _CACHEABLE, cacheable)
    drop_cache(masks)


def _cached(weight: Tensor, mask: Tensor) -> bool:
    return (
        getattr(mask, _CACHEABLE, False)
        and not torch.is_grad_enabled()
        and isinstance(weight, torch.nn.Parameter)
        and not torch.compiler.is_compiling()
        and not (weight.is_inference() or mask.is_inference())  # no versions: a write in place would go unseen
    )


def _cache_key(weight: Tensor, mask: Tensor) -> tuple[Any, ...]:
    return (
        id(weight),
        weight._version,
        weight.data_ptr(),
        weight.dtype,
        weight.device,
        mask._version,
        mask.data_ptr(),
        torch.is_inference_mode_enabled(),
    )


def _from_cache(weight: Tensor, mask: Tensor) -> Tensor | None:
    """The cached ``weight * mask`` (computed and stored on a miss), or None when it does not fit the bound."""
    key = _cache_key(weight, mask)
    hit = _CACHE.get(mask)
    if hit is not None and hit[0] == key:
        return hit[1]
    drop_cache([mask])  # a stale entry of this mask
    limit = _LIMIT[0]
    if limit is not None and cached_bytes() + weight.numel() * weight.element_size() > limit:
        return None
    out = masked_copy(weight, mask)  # a chunk at a time: no weight-sized float copy of a bool mask
    # look like the parameter to kernels that branch on requires_grad (matmul folds a transposed
    # 3-D input into one mm only when an operand requires grad): plain speed in every layout. A
    # no-grad leaf, reached only from this function under no_grad: it never joins an autograd graph
    out.requires_grad_(weight.requires_grad)
    with _LOCK:  # eval forwards in several threads: one entry a mask, every byte counted once
        hit = _CACHE.get(mask)
        if hit is not None and hit[0] == key:  # another thread stored the same product meanwhile
            return hit[1]
        drop_cache([mask])
        if limit is not None and cached_bytes() + out.nbytes > limit:
            return out
        _CACHE[mask] = (key, out, weakref.finalize(mask, _release, out.nbytes))  # a freed mask frees its entry
        _CACHED_BYTES[0] += out.nbytes
    return out


def _factor(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask cast to ``dtype`` through its uint8 view (the same 0/1; the bool cast kernel is ~8x slower)."""
    return mask.view(torch.uint8).to(dtype) if mask.dtype == torch.bool and dtype != torch.bool else mask


def _times(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask``: a bool mask is cast first (a mixed-dtype multiply casts per element, ~2-3x slower)."""
    return x * _factor(mask, x.dtype)


class _Masked(torch.autograd.Function):
    """``weight * mask`` whose backward keeps the (bool) mask, not its cast copy."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return _times(weight, mask)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return _times(grad, mask), None


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight * mask``, cached in eval mode while neither changes and autograd is off (within the bound)."""
    out = _from_cache(weight, mask) if _cached(weight, mask) else None
    if out is not None:
        return out
    if torch.is_grad_enabled() and weight.requires_grad and not mask.requires_grad:
        return _Masked.apply(weight, mask)
    return _times(weight, mask)


class _StraightThrough(torch.autograd.Function):
    """``weight * mask`` forward; the dense gradient backward (pruned weights keep learning)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor) -> Tensor:
        return _times(weight, mask)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def apply_mask_ste(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight * mask`` whose gradient reaches every weight (straight-through estimator)."""
    if not torch.is_grad_enabled():
        return apply_mask(weight, mask)
    return _StraightThrough.apply(weight, mask)


def mask_activation(
    x: Tensor, mask: Tensor, features: tuple[int, ...] | None = None, feature_dim: int | None = None
) -> Tensor:
    """``x * mask``; with ``features``, slice ``f`` along ``feature_dim`` is multiplied by ``mask[i]``."""
    if features is None:
        return x * mask
    out = x
    for i, f in enumerate(features):
        index = torch.tensor([f], device=x.device)
        out = out.index_copy(feature_dim, index, x.index_select(feature_dim, index) * mask[i])  # type: ignore[arg-type]
    return out


def embedding_masked(
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """``F.embedding`` of the masked table, computed on the gathered rows only."""
    table = _from_cache(weight, mask) if _cached(weight, mask) else None
    if table is not None:
        return F.embedding(input, table, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    # one fused pass in C (_kernels.c); an out-of-range padding_idx gets F.embedding's own error
    if (
        not torch.is_grad_enabled()
        and max_norm is None
        and (padding_idx is None or -weight.shape[0] <= padding_idx < weight.shape[0])
    ):
        out = _native.masked_rows(input, weight, mask)
        if out is not None:
            return out
    rows = F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return _mask_rows(rows, F.embedding(input, mask))


def _mask_rows(rows: Tensor, keep: Tensor) -> Tensor:
    """``rows * keep`` for freshly gathered rows: in place with autograd off (no cast copy of a bool mask)."""
    if not torch.is_grad_enabled() and (keep.dtype == torch.bool or keep.dtype == rows.dtype):
        return rows.mul_(_factor(keep, rows.dtype))  # same values as ``_times``, one temporary fewer
    return _times(rows, keep)


def embedding_bag_masked(
    input: Tensor,
    weight: Tensor,
    mask: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` of the masked table: mask the gathered rows, then pool them as bags."""
    if offsets is not None and offsets.dim() == 1 and offsets.numel() > 1 and bool((offsets.diff() < 0).any()):
        # torch pools such bags from memory it never wrote (NaN or garbage that changes from call to call)
        raise ValueError(
            f"embedding_bag offsets must not decrease, got {offsets.tolist()[:16]}; "
            "each offset is where a bag starts in the flat input"
        )
    table = _from_cache(weight, mask) if _cached(weight, mask) else None
    if table is not None:
        return F.embedding_bag(
            input,
            table,
            offsets,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            mode,
            sparse,
            per_sample_weights,
            include_last_offset,
            padding_idx,
        )
    if (
        not torch.is_grad_enabled()
        and max_norm is None
        and mode in ("sum", "mean")
        and per_sample_weights is None
        and padding_idx is None
    ):
        # one fused pass in C (_kernels.c): no gathered, cast or pooled copies of the rows
        out = _native.masked_bag(input, weight, mask, offsets, include_last_offset, mode == "mean")
        if out is not None:
            return out
    flat = input.reshape(-1)
    if not torch.is_grad_enabled() and max_norm is None and weight.is_floating_point():
        # bags of one id are the rows themselves, gathered by the fused lookup kernel (faster than index_select)
        gathered = F.embedding_bag(flat.view(-1, 1), weight, mode="sum")
    else:
        gathered = F.embedding(flat, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    rows = _mask_rows(gathered, F.embedding(flat, mask))
    if (
        input.dim() == 2
        and input.shape[1] == 1
        and mode in ("sum", "mean", "max")
        and per_sample_weights is None
        and padding_idx is None
    ):
        return rows  # bags of one id: sum, mean and max of one row are the row
    index = torch.arange(flat.numel(), device=flat.device)
    pad = None
    if padding_idx is not None:
        pad_value = padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]
        pad = flat.numel()
        index = torch.where(flat == pad_value, pad, index)
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return F.embedding_bag(
        index.view(input.shape),
        rows,
        offsets,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        padding_idx=pad,
    )


def module_call(module: torch.nn.Module, params: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Call a leaf module with some of its parameters replaced (masked): ``functional_call``."""
    return torch.func.functional_call(module, params, args, kwargs, tie_weights=False, strict=False)


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_padded(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pad: tuple[int, ...],
    padding_mode: str,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """A ``Conv`` with ``padding_mode != "zeros"``: pad, then the functional conv with no padding."""
    return _CONVS[weight.dim() - 2](F.pad(input, pad, mode=padding_mode), weight, bias, stride, 0, dilation, groups)


OPS = frozenset(
    {apply_mask, apply_mask_ste, mask_activation, embedding_masked, embedding_bag_masked, module_call, conv_padded}
)
