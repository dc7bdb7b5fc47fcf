"""Built-in mask methods, registered exactly the way a user registers one.

Each method is a *score* (``|x|``, an Lp norm over slices or blocks, random numbers, the raw value)
handed to a shared *selector* from :mod:`._selectors` (exact k-smallest, N:M groups, blocks).

Counting: ``sparsity`` (or ``density``) given as a float in [0, 1] is a fraction of the units
(entries, slices or blocks), rounded half-to-even (``round(sparsity * n)``, as ``torch.nn.utils.prune``);
given as an int it is an absolute count. Exact-count methods prune exactly that many, also under ties.

Random methods (``random_unstructured``, ``random_structured``, ``bernoulli``) draw from the
``generator`` they are given (the pipeline passes one seeded from the spec seed and the target name;
``None`` falls back to torch's default generator) and prune entries (or slices) that are exactly zero
first, so re-running a method on already-masked values keeps pruned entries pruned.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Callable

import torch
from torch import Tensor

from .._masks import PendingMask
from .._threads import serial_when_small
from ._registry import register_mask_method
from ._selectors import (
    block_grid,
    block_scores,
    count_to_prune,
    from_blocks,
    normalize_dim,
    prune_smallest,
    prune_smallest_in_groups,
    rank_smallest,
    to_blocks,
)

__all__: list[str] = ["PACKED_METHODS"]


# ---- validation helpers -------------------------------------------------------------------------
# Each method's ``_<name>_args(shape, **options)`` checks its options against a tensor shape and
# returns what the method needs; it is also registered as the method's ``check``, so the same errors
# come when the targets are known, before any tensor is touched. ``shape=None`` (the spec is built,
# no target known yet) runs only the checks that need no shape.


def _numel(shape: tuple[int, ...] | None) -> int:
    return sys.maxsize if shape is None else math.prod(shape)


def _need_dims(shape: tuple[int, ...] | None, method: str, ndim: int, why: str) -> None:
    if shape is not None and len(shape) < ndim:
        raise ValueError(
            f"{method} needs a tensor with at least {ndim} dims ({why}); got shape {tuple(shape)}. "
            "Use an unstructured method (l1_unstructured, random_unstructured) for it instead"
        )


def _int_option(value: object, method: str, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{method}: {name} must be an int, got {type(value).__name__}: {value!r}")
    if value < low:
        raise ValueError(f"{method}: {name} must be >= {low}, got {value}")
    return int(value)


def _real_option(value: object, method: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{method}: {name} must be a real number, got {type(value).__name__}: {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"{method}: {name} must not be NaN")
    return float(value)


def _ones(tensor: Tensor) -> Tensor:
    return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)


def _broadcast_slices(keep: Tensor, tensor: Tensor, dim: int) -> Tensor:
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    return keep.view(shape).expand(tensor.shape).contiguous()


def _uniform(shape: torch.Size | tuple[int, ...], tensor: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else tensor.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(tensor.device)


# ---- unstructured -------------------------------------------------------------------------------


def _unstructured_args(shape: tuple[int, ...] | None, *, sparsity: float | int) -> int:
    return count_to_prune(sparsity, _numel(shape))


@register_mask_method("l1_unstructured", check=_unstructured_args)
@serial_when_small
def l1_unstructured(tensor: Tensor, *, sparsity: float | int) -> Tensor:
    """Prune the entries of smallest |x| (exact count, as torch.nn.utils.prune.L1Unstructured)."""
    k = _unstructured_args(tensor.shape, sparsity=sparsity)
    if k == 0:
        return _ones(tensor)
    return prune_smallest(tensor, k, absolute=True)  # |x| a chunk at a time: no full-size copy


@serial_when_small
def _l1_unstructured_packed(tensor: Tensor, *, sparsity: float | int, **_: object) -> Tensor | PendingMask:
    """:func:`l1_unstructured`'s mask when k is 0 < k < n, as its threshold (no bool mask of the whole tensor;
    written, or packed, a chunk at a time)."""
    k = _unstructured_args(tensor.shape, sparsity=sparsity)
    if k in (0, tensor.numel()):
        return l1_unstructured(tensor, sparsity=sparsity)
    return rank_smallest(tensor, k, absolute=True)


#: methods with a variant that returns its keep mask pending (:class:`PendingMask`: packed at 1 bit per entry, or
#: as the threshold it is computed from), made a chunk at a time: step() takes it for large targets, whose new
#: masks it holds compact anyway until it writes them
#: (name → the registered function it stands in for, the compact variant): a method registered again under the
#: name (override=True) is not replaced
PACKED_METHODS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor | PendingMask]]] = {
    "l1_unstructured": (l1_unstructured, _l1_unstructured_packed),
}


def _topk_args(
    shape: tuple[int, ...] | None, *, density: float | int | None = None, sparsity: float | int | None = None
) -> int:
    if (density is None) == (sparsity is None):
        raise TypeError(
            f"topk takes exactly one of density (fraction kept) or sparsity (fraction pruned); "
            f"got density={density!r}, sparsity={sparsity!r}"
        )
    n = _numel(shape)
    if density is not None:
        return n - count_to_prune(density, n, what="density")
    assert sparsity is not None
    return count_to_prune(sparsity, n)


# step() shows a raw-value method pruned entries at -inf (not 0), so they stay pruned
@register_mask_method("topk", check=_topk_args, pruned_score=-math.inf)
@serial_when_small
def topk(tensor: Tensor, *, density: float | int | None = None, sparsity: float | int | None = None) -> Tensor:
    """Keep the entries with the largest raw scores (not magnitude; dmx TOPK); density or sparsity."""
    return prune_smallest(tensor, _topk_args(tensor.shape, density=density, sparsity=sparsity))


def _threshold_args(shape: tuple[int, ...] | None, *, threshold: float) -> float:
    t = _real_option(threshold, "threshold", "threshold")
    if t < 0:
        raise ValueError(f"threshold: threshold={t} is negative, so |x| < threshold never holds; pass a value >= 0")
    return t


@register_mask_method("threshold", check=_threshold_args)
@serial_when_small
def threshold(tensor: Tensor, *, threshold: float) -> Tensor:
    """Prune the entries with |x| < threshold."""
    return tensor.abs() >= _threshold_args(tensor.shape, threshold=threshold)


@register_mask_method("dense")
def dense(tensor: Tensor) -> Tensor:
    """Keep everything."""
    return _ones(tensor)


# ---- structured ---------------------------------------------------------------------------------


def _slice_norms(tensor: Tensor, p: float, dim: int) -> Tensor:
    others = [d for d in range(tensor.dim()) if d != dim]
    return torch.linalg.vector_norm(tensor, ord=p, dim=others)


def _slices_args(
    shape: tuple[int, ...] | None, method: str, why: str, sparsity: float | int, dim: int
) -> tuple[int, int]:
    """(dim, slices to prune) for a method that prunes whole slices along ``dim``."""
    _need_dims(shape, method, 2, why)
    if shape is None:
        return normalize_dim(dim, sys.maxsize, method=method), count_to_prune(sparsity, sys.maxsize)
    dim = normalize_dim(dim, len(shape), method=method)
    return dim, count_to_prune(sparsity, shape[dim])


def _ln_args(
    shape: tuple[int, ...] | None, *, sparsity: float | int, p: float = 2, dim: int = 0
) -> tuple[float, int, int]:
    why = "it prunes slices along dim, measured over the other dims"
    dim, k = _slices_args(shape, "ln_structured", why, sparsity, dim)
    return _real_option(p, "ln_structured", "p"), dim, k


@register_mask_method("ln_structured", check=_ln_args)
@serial_when_small
def ln_structured(tensor: Tensor, *, sparsity: float | int, p: float = 2, dim: int = 0) -> Tensor:
    """Prune whole slices along dim of smallest Lp norm over the other dims (as prune.LnStructured)."""
    p, dim, k = _ln_args(tensor.shape, sparsity=sparsity, p=p, dim=dim)
    if k == 0:
        return _ones(tensor)
    return _broadcast_slices(prune_smallest(_slice_norms(tensor, p, dim), k), tensor, dim)


def _nm_args(shape: tuple[int, ...] | None, *, n: int, m: int, dim: int | None = None) -> tuple[int, int, int | None]:
    m = _int_option(m, "nm", "m", 1)
    n = _int_option(n, "nm", "n", 0)
    if n > m:
        raise ValueError(f"nm: n={n} kept out of every m={m} is impossible; n must be <= m")
    if shape is None:
        return n, m, None if dim is None else normalize_dim(dim, sys.maxsize, method="nm")
    if not shape:
        raise ValueError("nm needs a tensor with at least 1 dim; got a 0-d tensor")
    if dim is None:  # the input features of a Linear (out, in), the input channels of a conv (out, in, *kernel)
        dim = 1 if len(shape) >= 2 else 0
    dim = normalize_dim(dim, len(shape), method="nm")
    if shape[dim] % m:
        raise ValueError(
            f"nm: dim {dim} of shape {tuple(shape)} has size {shape[dim]}, not divisible by m={m}; "
            f"pick a dim whose size is a multiple of {m} (or pad the tensor)"
        )
    return n, m, dim


@register_mask_method("nm", aliases=("block_topk",), check=_nm_args)
@serial_when_small
def nm(tensor: Tensor, *, n: int, m: int, dim: int | None = None) -> Tensor:
    """Keep the n largest |x| in every run of m consecutive entries along dim (N:M, e.g. 2:4).

    The default dim is 1: a Linear weight's input features and a convolution's input channels, in groups of
    m per output channel and kernel position (as NVIDIA's ASP prunes convolutions); dim 0 for a 1-d tensor.
    """
    n, m, found = _nm_args(tensor.shape, n=n, m=m, dim=dim)
    assert found is not None  # a known shape gives a dim
    dim = found
    size = tensor.shape[dim]
    moved = tensor.movedim(dim, -1)
    groups = moved.abs().reshape(*moved.shape[:-1], size // m, m)
    keep = prune_smallest_in_groups(groups, m - n)
    return keep.reshape(moved.shape).movedim(-1, dim).contiguous()


def _block_args(
    shape: tuple[int, ...] | None,
    *,
    sparsity: float | int,
    block_shape: tuple[int, ...] = (1, 4),
    zeros_per_block: int | None = None,
    p: float = 2,
) -> tuple[tuple[int, ...], int, int, int, int, float]:
    """(block grid, entries per block, zeros per block, number of blocks, blocks to prune, p)."""
    if isinstance(block_shape, numbers.Integral) and not isinstance(block_shape, bool):
        block_shape = (int(block_shape),)
    if not isinstance(block_shape, (tuple, list)) or not all(
        isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in block_shape
    ):
        raise TypeError(f"block: block_shape must be a tuple of ints such as (1, 4), got {block_shape!r}")
    p = _real_option(p, "block", "p")
    if not p > 0:
        raise ValueError(f"block: p={p}; the block norm needs p > 0 (p=1 for L1, p=2 for L2, p=inf for max)")
    if not block_shape or any(b < 1 for b in block_shape):
        raise ValueError(f"block: block_shape must be positive ints such as (1, 4), got {tuple(block_shape)!r}")
    if any(b > 2**31 - 1 for b in block_shape):  # products and int64 tensors of sizes would overflow at step()
        raise ValueError(
            f"block: block_shape {tuple(block_shape)!r:.80} has a size larger than 2**31 - 1, more than "
            "any tensor dim; give block sizes such as (1, 4)"
        )
    blk = tuple(block_shape) if shape is None else block_grid(shape, block_shape)
    vpb = math.prod(blk)
    zpb = vpb if zeros_per_block is None else _int_option(zeros_per_block, "block", "zeros_per_block", 0)
    if zpb > vpb:
        raise ValueError(f"block: zeros_per_block={zpb} is more than the {vpb} entries of a {tuple(block_shape)} block")
    n_blocks = sys.maxsize if shape is None else math.prod(-(-s // b) for s, b in zip(shape, blk))
    return blk, vpb, zpb, n_blocks, count_to_prune(sparsity, n_blocks), p


@register_mask_method("block", check=_block_args)
@serial_when_small
def block(
    tensor: Tensor,
    *,
    sparsity: float | int,
    block_shape: tuple[int, ...] = (1, 4),
    zeros_per_block: int | None = None,
    p: float = 2,
) -> Tensor:
    """Prune the blocks of smallest norm; zeros_per_block smallest |x| inside each (WeightNormSparsifier)."""
    blk, vpb, zpb, n_blocks, k, p = _block_args(
        tensor.shape, sparsity=sparsity, block_shape=block_shape, zeros_per_block=zeros_per_block, p=p
    )
    if k == 0 or zpb == 0 or tensor.numel() == 0:
        return _ones(tensor)
    if k == n_blocks:
        keep_block = torch.zeros((n_blocks, 1), dtype=torch.bool, device=tensor.device)
    else:
        keep_block = prune_smallest(block_scores(tensor, blk, p), k).unsqueeze(1)
    if zpb == vpb:
        return from_blocks(keep_block, tensor.shape, blk)
    # Inside a pruned block only the zpb smallest |x| go; padding (+inf) is never chosen before real entries.
    within = prune_smallest_in_groups(to_blocks(tensor.abs(), blk, math.inf), zpb)
    return from_blocks(within.logical_or_(keep_block), tensor.shape, blk)


# ---- random -------------------------------------------------------------------------------------


@register_mask_method("random_unstructured", check=_unstructured_args)
@serial_when_small
def random_unstructured(tensor: Tensor, *, sparsity: float | int, generator: torch.Generator | None = None) -> Tensor:
    """Prune exactly k entries chosen at random (seeded), exact zeros first."""
    k = _unstructured_args(tensor.shape, sparsity=sparsity)
    if k == 0:
        return _ones(tensor)
    scores = _uniform(tensor.shape, tensor, generator)  # in [0, 1)
    if int(torch.count_nonzero(tensor)) < tensor.numel():
        scores[tensor == 0] -= 1  # zeros score in [-1, 0): pruned first, in random order
    return prune_smallest(scores, k)


def _random_structured_args(shape: tuple[int, ...] | None, *, sparsity: float | int, dim: int = 0) -> tuple[int, int]:
    return _slices_args(shape, "random_structured", "it prunes slices along dim", sparsity, dim)


@register_mask_method("random_structured", check=_random_structured_args)
@serial_when_small
def random_structured(
    tensor: Tensor, *, sparsity: float | int, dim: int = 0, generator: torch.Generator | None = None
) -> Tensor:
    """Prune exactly k slices along dim chosen at random (seeded), all-zero slices first."""
    dim, k = _random_structured_args(tensor.shape, sparsity=sparsity, dim=dim)
    if k == 0:
        return _ones(tensor)
    scores = _uniform((tensor.shape[dim],), tensor, generator)
    others = [d for d in range(tensor.dim()) if d != dim]
    zero = (tensor != 0).sum(dim=others) == 0
    scores.sub_(zero.to(scores.dtype))
    return _broadcast_slices(prune_smallest(scores, k), tensor, dim)


def _bernoulli_args(shape: tuple[int, ...] | None, *, density: float = 0.5) -> float:
    d = _real_option(density, "bernoulli", "density")
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"bernoulli: density={density} is the probability of keeping an entry; it must be in [0, 1]")
    return d


@register_mask_method("bernoulli", check=_bernoulli_args)
@serial_when_small
def bernoulli(tensor: Tensor, *, density: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Keep each entry with probability density (seeded); exact zeros are pruned first."""
    d = _bernoulli_args(tensor.shape, density=density)
    nonzero = tensor != 0
    nnz = int(torch.count_nonzero(nonzero))
    if nnz == 0:
        return nonzero
    # Zeros are always pruned; the nonzero entries are kept with the probability that keeps the
    # expected density at `density` overall (capped at 1).
    q = min(1.0, d * tensor.numel() / nnz)
    return (_uniform(tensor.shape, tensor, generator) < q).logical_and_(nonzero)
