"""Shared, vectorised selectors. Scores are computed by the methods; these pick what to keep.

Every selector returns a boolean keep-mask (True = kept) and prunes *exactly* the requested count,
also when scores tie. Among exactly tied scores the entry with the lower flat index is pruned first,
so results are deterministic (``torch.topk``, which the references use, picks among ties in an
unspecified order: that choice is the only place our masks may differ from theirs). NaN scores are
refused with a ``ValueError`` (:func:`refuse_nan`): a NaN has no rank, so no exact count could hold.

No selector loops over elements or blocks in Python. :func:`prune_smallest_in_groups` loops over the
``m`` *positions* of a group (``m <= 8``), each step a vectorised op over all groups.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._masks import PackedMask
from .._threads import serial_when_small

__all__ = [
    "count_to_prune",
    "refuse_nan",
    "warn_if_percent_like",
    "ENTRY_COUNTS",
    "kth_smallest",
    "prune_smallest",
    "prune_smallest_packed",
    "prune_smallest_in_groups",
    "normalize_dim",
    "block_grid",
    "to_blocks",
    "from_blocks",
    "block_scores",
]

# Below this many elements a plain torch.kthvalue is as fast as the sampled band search.
SMALL = 1 << 16
SAMPLE = 1 << 16
# Full-size scans run over chunks of this many elements, so boolean temporaries stay small.
CHUNK = 1 << 20
# Pairwise ranking beats torch.topk for groups up to this size.
_PAIRWISE_MAX_M = 8


def count_to_prune(amount: float | int, n: int, *, what: str = "sparsity") -> int:
    """How many of ``n`` units to prune: a float in [0, 1] is rounded half-to-even, an int is a count.

    >>> count_to_prune(0.5, 5), count_to_prune(0.7, 5), count_to_prune(3, 5)
    (2, 4, 3)
    """
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{what} must be a float in [0, 1] or an int count, got {type(amount).__name__}: {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0 or amount > n:
            raise ValueError(
                f"{what}={amount} is a count of units; it must be in [0, {n}] for this tensor "
                f"(pass a float in [0, 1] for a fraction)"
            )
        return int(amount)
    if math.isnan(float(amount)) or not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"{what}={amount} is a fraction; it must be in [0, 1] (or pass an int count)")
    return round(float(amount) * n)


#: built-in methods whose int ``sparsity`` counts entries (where ``50`` may be a percentage typed as an int)
ENTRY_COUNTS = frozenset({"l1_unstructured", "random_unstructured", "topk"})


def warn_if_percent_like(amount: object, n: int, where: str, stacklevel: int = 3) -> None:
    """Warn when an int count looks like a percentage: ``2 <= count <= 100`` and under 1 % of ``n`` units.

    ``"sparsity": 50`` prunes 50 entries, not half; counts stay counts, but this one is likely a mistake.
    """
    if (
        isinstance(amount, numbers.Integral)
        and not isinstance(amount, bool)
        and 2 <= int(amount) <= 100
        and amount < 0.01 * n
    ):
        warnings.warn(
            f"{where}: sparsity={amount} is an int, so it prunes {amount} of the {n} entries ({amount / n:.2%}), "
            f"not {amount}%. For a fraction pass a float (sparsity={amount / 100}); for a count this small, silence "
            "this with warnings.filterwarnings('ignore', message='.*is an int, so it prunes')",
            UserWarning,
            stacklevel=stacklevel,
        )


def normalize_dim(dim: int, ndim: int, *, method: str) -> int:
    """``dim`` as a non-negative index, or a ``ValueError`` saying which dims the tensor has."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{method}: dim must be an int, got {type(dim).__name__}: {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{method}: dim={dim} is out of range for a {ndim}-D tensor; pass a dim in [{-ndim}, {ndim - 1}]"
        )
    return int(dim) % ndim


@serial_when_small
def refuse_nan(tensor: Tensor, what: str) -> None:
    """The NaN rule: a NaN score has no rank, so a mask computed from it is refused (``ValueError``).

    Exact counts cannot hold when NaN compares false to everything, and ranking NaN anywhere would
    silently keep or drop weights whose value is lost. A sum spots a NaN in one cheap pass; only then
    (or for ``inf - inf``) are the entries counted.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0 or not bool(torch.isnan(tensor.sum())):
        return
    bad = int(torch.isnan(tensor).sum())
    if bad:
        raise ValueError(
            f"{what} contain {bad} NaN value(s) out of {tensor.numel()}; a NaN has no rank, so no exact mask "
            "can be computed. Fix the NaN at its source (a diverged weight, a calibration batch with NaN) "
            "or replace it (torch.nan_to_num) before step()"
        )


def _selectable(scores: Tensor) -> Tensor:
    if scores.dtype == torch.bool:
        return scores.to(torch.uint8)
    if scores.is_complex():
        raise TypeError("mask scores must be real; got a complex tensor (score it with .abs() first)")
    return scores


def kth_smallest(flat: Tensor, k: int, *, absolute: bool = False) -> Tensor:
    """The exact ``k``-th smallest value (1-based) of a 1-D tensor, as a 0-d tensor.

    ``absolute=True`` ranks ``|flat|`` without a full-size copy (each chunk's ``abs`` is a temporary).

    Large tensors use a sampled band search: a random sample brackets the k-th value in ``[lo, hi]``,
    only the (few) values inside the band are ranked exactly. The result is exact whatever the sample;
    a missed bracket falls back to ``torch.kthvalue`` on the whole tensor.
    """
    n = flat.numel()
    assert 1 <= k <= n, (k, n)
    if n <= SMALL:
        return torch.kthvalue(flat.abs() if absolute else flat, k).values
    gen = torch.Generator(device=flat.device)
    gen.manual_seed(0x5EED)
    idx = torch.randint(n, (SAMPLE,), generator=gen, device=flat.device)
    lo, hi = bracket(torch.sort(flat[idx].abs() if absolute else flat[idx]).values, k / n)
    if lo is not None or hi is not None:
        kth = kth_in_band((chunk.abs() if absolute else chunk for chunk in flat.split(CHUNK)), k, lo, hi)
        if kth is not None:
            return kth
    return torch.kthvalue(flat.abs() if absolute else flat, k).values


def bracket(sample: Tensor, q: float) -> tuple[Tensor | None, Tensor | None]:
    """``(lo, hi)`` from a sorted random ``sample``: values that bracket the ``q``-quantile with high
    probability (``None`` for a side that falls off the sample's ends)."""
    eps = 4.0 / math.sqrt(sample.numel())
    lo_i, hi_i = math.floor((q - eps) * sample.numel()), math.ceil((q + eps) * sample.numel())
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < sample.numel() else None
    return lo, hi


def kth_in_band(chunks: Iterable[Tensor], k: int, lo: Tensor | None, hi: Tensor | None) -> Tensor | None:
    """The k-th smallest (1-based) of all the values ``chunks`` yield, found inside the band ``(lo, hi]``
    (at least one of ``lo``/``hi`` given); ``None`` when the bracket missed it.

    Chunked, so the boolean temporaries stay small (peak extra memory is the caller's concern).
    Entries equal to ``lo`` are counted, not collected: a value tied far and wide (the pruned zeros
    at a repeated step) would otherwise put most of the tensor in the band.
    """
    below, at_lo, parts = 0, 0, []
    for chunk in chunks:
        if lo is None:
            assert hi is not None  # one of lo / hi is given
            in_band = torch.le(chunk, hi)
        else:
            below += int(torch.count_nonzero(torch.lt(chunk, lo)))
            at_lo += int(torch.count_nonzero(torch.eq(chunk, lo)))
            in_band = torch.gt(chunk, lo)
            if hi is not None:
                in_band.logical_and_(torch.le(chunk, hi))
        parts.append(chunk[in_band])
    band = torch.cat(parts)
    if lo is not None and below < k <= below + at_lo:
        return lo
    if below + at_lo < k <= below + at_lo + band.numel():
        return torch.kthvalue(band, k - below - at_lo).values
    return None


def prune_first_ties(pairs: Iterable[tuple[Tensor, Tensor]], kth: Tensor, need: int) -> None:
    """Prune (set False in ``kept``) the first ``need`` entries equal to ``kth``, over ``(values, kept)``
    chunk pairs in order; a chunk whose ties all go is masked whole, without an index list (ties may be
    most of the tensor)."""
    for values, kept in pairs:
        if need <= 0:
            break
        tied = values == kth
        count = int(torch.count_nonzero(tied))
        if count <= need:
            kept.logical_and_(tied.logical_not_())
            need -= count
        else:
            kept[torch.nonzero(tied).squeeze(1)[:need]] = False
            need = 0


def prune_smallest(scores: Tensor, k: int, *, absolute: bool = False) -> Tensor:
    """Keep-mask of ``scores``' shape pruning exactly the ``k`` smallest entries (of ``|scores|`` when
    ``absolute``, computed a chunk at a time: no full-size copy of the scores).

    Ties at the threshold are pruned lowest flat index first. NaN scores are refused (:func:`refuse_nan`).
    """
    n = scores.numel()
    assert 0 <= k <= n, (k, n)
    if k == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k == n:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    refuse_nan(scores, "the scores")
    flat = _selectable(scores).reshape(-1)
    kth = kth_smallest(flat, k, absolute=absolute)
    if absolute:
        keep = torch.empty(n, dtype=torch.bool, device=flat.device)
        for chunk, out in zip(flat.split(CHUNK), keep.split(CHUNK)):
            torch.lt(chunk.abs(), kth, out=out).logical_not_()
    else:
        keep = torch.lt(flat, kth).logical_not_()
    below = n - int(torch.count_nonzero(keep))  # entries strictly below kth
    need = k - below  # how many of the entries equal to kth to prune
    prune_first_ties(
        ((chunk.abs() if absolute else chunk, kept) for chunk, kept in zip(flat.split(CHUNK), keep.split(CHUNK))),
        kth,
        need,
    )
    return keep.view(scores.shape)


def prune_smallest_packed(scores: Tensor, k: int, *, absolute: bool = False) -> PackedMask:
    """:func:`prune_smallest`'s keep-mask (the same entries), made and packed a chunk at a time: never a bool
    mask of the whole tensor (1/4 of an fp32 weight), only the 1-bit result and two chunk buffers, reused (fresh
    temporaries a chunk were kept by the C heap: the step's resident memory grew by tens of MiB)."""
    n = scores.numel()
    assert 0 < k < n, (k, n)
    refuse_nan(scores, "the scores")
    flat = _selectable(scores).reshape(-1)
    kth = kth_smallest(flat, k, absolute=absolute)
    chunks = flat.split(CHUNK)  # CHUNK is a multiple of 8: every chunk starts on a byte of the packed mask
    values_buf = torch.empty(len(chunks[0]), dtype=flat.dtype, device=flat.device) if absolute else None
    keep_buf = torch.empty(len(chunks[0]), dtype=torch.bool, device=flat.device)

    def ranked(chunk: Tensor) -> tuple[Tensor, Tensor]:
        """(the chunk's values as ranked, its keep mask before ties) in the reused buffers."""
        values = torch.abs(chunk, out=values_buf[: chunk.numel()]) if values_buf is not None else chunk
        return values, torch.lt(values, kth, out=keep_buf[: chunk.numel()])

    below = sum(int(torch.count_nonzero(ranked(c)[1])) for c in chunks)
    need = k - below  # how many of the entries equal to kth to prune, lowest flat index first
    out = PackedMask.packing(tuple(scores.shape), flat.device)
    for i, chunk in enumerate(chunks):
        values, keep = ranked(chunk)
        keep.logical_not_()
        if need > 0:
            tied = torch.nonzero(values == kth).squeeze(1)[:need]
            keep[tied] = False
            need -= tied.numel()
        out.pack(i * CHUNK, keep)
    return out


def prune_smallest_in_groups(scores: Tensor, k: int) -> Tensor:
    """Keep-mask pruning exactly the ``k`` smallest of every group along the last dim.

    ``scores`` has shape ``(..., m)``. Ties inside a group prune the lower position first.
    For ``m <= 8`` each position's rank in its group is counted with ``m * (m - 1) / 2`` vectorised
    comparisons (about 3x faster than ``torch.topk`` on 4-wide groups); larger groups use topk.
    """
    m = scores.shape[-1]
    assert 0 <= k <= m, (k, m)
    if k == 0 or scores.numel() == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k == m:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    refuse_nan(scores, "the scores")
    scores = _selectable(scores)
    if m > _PAIRWISE_MAX_M:
        # Stable ranking: lower position pruned first among ties, as in the pairwise path.
        order = torch.argsort(scores, dim=-1, stable=True)[..., :k]
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return keep.scatter_(-1, order, False)
    cols = [scores[..., i] for i in range(m)]
    # acc[i] + (m - 1 - i) is position i's rank (number of group members ranked below it).
    acc = [torch.zeros(cols[0].shape, dtype=torch.int8, device=scores.device) for _ in range(m)]
    for i in range(m):
        for j in range(i):
            below = (cols[j] <= cols[i]).view(torch.int8)  # j ranks below i (ties: lower index first)
            acc[i].add_(below)
            acc[j].sub_(below)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for i in range(m):
        keep[..., i] = acc[i] >= k - (m - 1 - i)
    return keep


# ---- blocks ------------------------------------------------------------------------------------


def block_grid(shape: Sequence[int], block_shape: Sequence[int], *, method: str = "block") -> tuple[int, ...]:
    """``block_shape`` aligned to ``shape``'s trailing dims (leading dims get block size 1).

    A block shape longer than the tensor is accepted when its extra leading sizes are 1, so
    ``(1, 4)`` works on a 1-D tensor.
    """
    block = tuple(int(b) for b in block_shape)
    if not block or any(b < 1 for b in block):
        raise ValueError(f"{method}: block_shape must be positive ints, got {tuple(block_shape)!r}")
    extra = len(block) - len(shape)
    if extra > 0:
        if any(b != 1 for b in block[:extra]):
            raise ValueError(
                f"{method}: block_shape={block} has more dims than the {len(shape)}-D tensor of shape "
                f"{tuple(shape)}; use a block shape with at most {len(shape)} dims (leading 1s are allowed)"
            )
        block = block[extra:]
    return (1,) * (len(shape) - len(block)) + block


def _padded(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-s // b) * b for s, b in zip(shape, block))


def _interleaved(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    padded = _padded(shape, block)
    return tuple(x for p, b in zip(padded, block) for x in (p // b, b))


def to_blocks(x: Tensor, block: Sequence[int], fill: float) -> Tensor:
    """``x`` cut into blocks: shape ``(n_blocks, prod(block))``, blocks in row-major grid order.

    Ragged edge blocks are padded with ``fill``.
    """
    padded = _padded(x.shape, block)
    if padded != tuple(x.shape):
        big = x.new_full(padded, fill)
        big[tuple(slice(0, s) for s in x.shape)] = x
        x = big
    d = x.dim()
    perm = [2 * i for i in range(d)] + [2 * i + 1 for i in range(d)]
    vpb = math.prod(block)
    return x.reshape(_interleaved(x.shape, block)).permute(perm).reshape(-1, vpb)


def from_blocks(blocks: Tensor, shape: Sequence[int], block: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_blocks` (cropping the padding). ``blocks`` may be ``(n_blocks, 1)`` to broadcast."""
    d = len(shape)
    padded = _padded(shape, block)
    grid = tuple(p // b for p, b in zip(padded, block))
    vpb = math.prod(block)
    blocks = blocks.expand(blocks.shape[0], vpb).reshape(*grid, *block)
    perm = [x for i in range(d) for x in (i, d + i)]
    out = blocks.permute(perm).reshape(padded)
    if padded != tuple(shape):
        out = out[tuple(slice(0, s) for s in shape)]
    return out.contiguous()


def block_scores(x: Tensor, block: Sequence[int], p: float) -> Tensor:
    """Mean of ``|x|**p`` over the in-bounds entries of each block (max of ``|x|`` for ``p=inf``), flat.

    This is ``WeightNormSparsifier``'s ranking: ``avg_pool2d(norm_fn(w), ceil_mode=True)`` averages a
    ragged edge block over its in-bounds entries only. For full blocks it orders like the Lp norm.
    """
    a = x.abs()
    if p == 2:
        a = a.mul_(a)
    elif p != 1 and not math.isinf(p):
        a = a.pow_(p)
    padded = _padded(x.shape, block)
    if padded != tuple(x.shape):
        big = a.new_zeros(padded)
        big[tuple(slice(0, s) for s in x.shape)] = a
        a = big
    view = a.reshape(_interleaved(a.shape, block))
    inner = tuple(2 * i + 1 for i in range(x.dim()))
    if math.isinf(p):
        return view.amax(dim=inner).reshape(-1)
    sums = view.sum(dim=inner, dtype=torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else None)
    if padded == tuple(x.shape):
        return sums.reshape(-1)
    counts = torch.ones((), dtype=sums.dtype, device=sums.device)
    for i, (s, b) in enumerate(zip(x.shape, block)):
        starts = torch.arange(0, -(-s // b) * b, b, device=sums.device)
        c = (s - starts).clamp(max=b).to(sums.dtype)
        counts = counts.unsqueeze(-1) * c if i else c
    return (sums / counts).reshape(-1)
