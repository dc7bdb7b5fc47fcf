"""Shared, vectorised selectors. Scores are computed by the methods; these pick what to keep.

Every selector returns a boolean keep-mask (True = kept; :func:`rank_smallest` the same mask held as its
threshold, a :class:`ThresholdMask` that makes the bits when written) and prunes *exactly* the requested
count, also when scores tie. Among exactly tied scores the entry with the lower flat index is pruned first,
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
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .._masks import PackedMask, PendingMask
from .._threads import serial_below, serial_when_small

__all__ = [
    "count_to_prune",
    "refuse_nan",
    "warn_if_percent_like",
    "ENTRY_COUNTS",
    "kth_smallest",
    "kth_and_below",
    "ranked_chunks",
    "prune_ties",
    "prune_smallest",
    "ThresholdMask",
    "rank_smallest",
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

    ``absolute=True`` ranks ``|flat|`` without a full-size copy (each chunk's ``abs`` goes into one reused buffer).
    """
    return kth_and_below(flat, k, absolute=absolute)[0]


def kth_and_below(flat: Tensor, k: int, *, absolute: bool = False) -> tuple[Tensor, int]:
    """:func:`kth_smallest` and how many entries are strictly below it (``absolute``: of ``|flat|``).

    Large tensors use a sampled band search: a random sample brackets the k-th value in ``[lo, hi]``,
    only the (few) values inside the band are ranked exactly (by the same search, until a band is small).
    The result is exact whatever the sample; a missed bracket falls back to ``torch.kthvalue`` on the whole
    tensor.
    """
    n = flat.numel()
    assert 1 <= k <= n, (k, n)
    if n > SMALL:
        gen = torch.Generator(device=flat.device)
        gen.manual_seed(0x5EED)
        idx = torch.randint(n, (SAMPLE,), generator=gen, device=flat.device)
        sample = flat[idx]
        del idx
        lo, hi = bracket(torch.sort(sample.abs_() if absolute else sample).values, k / n)
        del sample
        if lo is not None or hi is not None:
            found = kth_in_band(ranked_chunks(flat, absolute), k, lo, hi)
            if found is not None:
                return found
    values = flat.abs() if absolute else flat  # small, or a missed bracket (rare)
    kth = torch.kthvalue(values, k).values
    return kth, int(torch.count_nonzero(torch.lt(values, kth)))


def ranked_chunks(flat: Tensor, absolute: bool, dtype: torch.dtype | None = None) -> Iterator[Tensor]:
    """``flat`` (``|flat|`` when ``absolute``; cast to ``dtype`` when given) a chunk of :data:`CHUNK` at a time;
    the ``abs`` / cast chunks are one reused buffer, each valid until the next is yielded."""
    chunks = flat.split(CHUNK)
    cast = dtype is not None and dtype != flat.dtype
    if not (absolute or cast):
        yield from chunks
        return
    buf = torch.empty(len(chunks[0]) if chunks else 0, dtype=dtype if cast else flat.dtype, device=flat.device)
    for chunk in chunks:
        out = buf[: chunk.numel()]
        if cast:
            yield out.copy_(chunk).abs_() if absolute else out.copy_(chunk)  # |cast(x)| == cast(|x|)
        else:
            yield torch.abs(chunk, out=out)


def bracket(sample: Tensor, q: float) -> tuple[Tensor | None, Tensor | None]:
    """``(lo, hi)`` from a sorted random ``sample``: values that bracket the ``q``-quantile with high
    probability (``None`` for a side that falls off the sample's ends)."""
    eps = 4.0 / math.sqrt(sample.numel())
    lo_i, hi_i = math.floor((q - eps) * sample.numel()), math.ceil((q + eps) * sample.numel())
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < sample.numel() else None
    return lo, hi


def kth_in_band(chunks: Iterable[Tensor], k: int, lo: Tensor | None, hi: Tensor | None) -> tuple[Tensor, int] | None:
    """The k-th smallest (1-based) of all the values ``chunks`` yield, found inside the band ``[lo, hi]``
    (at least one of ``lo``/``hi`` given), and how many values are strictly below it; ``None`` when the
    bracket missed it.

    Chunked, with two reused boolean buffers, so the temporaries stay small (peak extra memory is the
    caller's concern). Entries equal to ``lo`` or ``hi`` are counted, not collected: a value tied far and wide
    (the pruned zeros at a repeated step) would otherwise put most of the tensor in the band. The band strictly
    inside is ranked by :func:`kth_and_below` in turn (by ``torch.kthvalue`` when it is most of the values).
    """
    upper: Tensor | None = hi  # the band's open upper end
    if lo is not None and hi is not None and bool(lo == hi):
        hi = None  # one value: its ties are counted once, as lo's
    total, below, at_lo, at_hi, parts = 0, 0, 0, 0, []
    flags: list[Tensor] = []
    for chunk in chunks:
        total += chunk.numel()
        if not flags or flags[0].numel() < chunk.numel():
            flags = [torch.empty(chunk.numel(), dtype=torch.bool, device=chunk.device) for _ in range(2)]
        f, g = (b[: chunk.numel()] for b in flags)
        if hi is not None:
            at_hi += int(torch.count_nonzero(torch.eq(chunk, hi, out=f)))
        if lo is None:
            assert upper is not None  # one of lo / hi is given
            in_band = torch.lt(chunk, upper, out=f)
        else:
            below += int(torch.count_nonzero(torch.lt(chunk, lo, out=f)))
            at_lo += int(torch.count_nonzero(torch.eq(chunk, lo, out=f)))
            in_band = torch.gt(chunk, lo, out=f)
            if upper is not None:
                in_band.logical_and_(torch.lt(chunk, upper, out=g))
        parts.append(chunk[in_band])
    del flags
    band = torch.cat(parts)
    parts.clear()
    if lo is not None and below < k <= below + at_lo:
        return lo, below
    j = k - below - at_lo
    if 0 < j <= band.numel():
        if 2 * band.numel() > total:  # the band did not shrink (ranking it in turn might not either)
            kth = torch.kthvalue(band, j).values
            return kth, below + at_lo + int(torch.count_nonzero(torch.lt(band, kth)))
        kth, under = kth_and_below(band, j)
        return kth, below + at_lo + under
    if hi is not None and band.numel() < j <= band.numel() + at_hi:
        return hi, below + at_lo + band.numel()
    return None


#: the entries scanned at a time for the ties to prune inside the one chunk where they run out (an index list
#: of at most this many)
TIE_PIECE = 1 << 14


def prune_ties(values: Tensor, kept: Tensor, kth: Tensor, need: int) -> int:
    """Prune (set False in the 1-D ``kept``) the first ``need`` entries of ``values`` equal to ``kth``; how many
    are still to prune after this chunk. A chunk whose ties all go is masked whole, without an index list (ties
    may be most of the tensor); the chunk where they run out is scanned a small piece at a time."""
    tied = torch.eq(values, kth)
    count = int(torch.count_nonzero(tied))
    if count <= need:
        kept.logical_and_(tied.logical_not_())
        return need - count
    for t, k in zip(tied.split(TIE_PIECE), kept.split(TIE_PIECE)):
        here = int(torch.count_nonzero(t))
        if here > need:
            k[torch.nonzero(t).squeeze(1)[:need]] = False
            return 0
        k.logical_and_(t.logical_not())
        need -= here
    return need


def prune_first_ties(pairs: Iterable[tuple[Tensor, Tensor]], kth: Tensor, need: int) -> None:
    """Prune (set False in ``kept``) the first ``need`` entries equal to ``kth``, over ``(values, kept)``
    chunk pairs in order (see :func:`prune_ties`)."""
    for values, kept in pairs:
        if need <= 0:
            break
        need = prune_ties(values, kept, kth, need)


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


class ThresholdMask(PendingMask):
    """:func:`prune_smallest`'s keep mask held as its rule rather than its bits: the entries of ``source``
    (``|source|`` when ``absolute``) below ``kth`` are pruned, and the first ``ties`` entries equal to it (lowest
    flat index first), compared as ``dtype`` when given. Held, it costs nothing but a reference to ``source``;
    :meth:`unpack_into` and :meth:`packed` make the bits a chunk at a time. ``source`` must not change until then
    (:meth:`stale`)."""

    def __init__(
        self,
        source: Tensor,
        shape: tuple[int, ...],
        kth: Tensor,
        ties: int,
        absolute: bool,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.source, self.shape = source.reshape(-1), tuple(shape)
        self.kth, self.ties, self.absolute, self.dtype = kth, ties, absolute, dtype
        # an inference tensor (made under torch.inference_mode) counts no versions: no check then
        self.version = None if source.is_inference() else source._version

    def reads(self) -> Tensor:
        return self.source

    def stale(self) -> bool:
        """Whether ``source`` was written in place since it was ranked (the mask would no longer be its rank)."""
        return self.version is not None and self.source._version != self.version

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """``(start, keep)`` over the flat mask in order, ``keep`` a reused bool buffer valid until the next."""
        chunk = CHUNK
        keep_buf = torch.empty(min(chunk, self.source.numel()), dtype=torch.bool, device=self.source.device)
        need = self.ties
        for i, values in enumerate(ranked_chunks(self.source, self.absolute, self.dtype)):
            keep = torch.lt(values, self.kth, out=keep_buf[: values.numel()]).logical_not_()
            if need > 0:
                need = prune_ties(values, keep, self.kth, need)
            yield i * chunk, keep

    def packed(self) -> PackedMask:
        out = PackedMask.packing(self.shape, self.source.device)  # CHUNK is a multiple of 8: starts on a byte
        with serial_below(self.source.numel()):
            for start, keep in self.chunks():
                out.pack(start, keep)
        return out

    def unpack_flat(self, flat: Tensor) -> None:
        for start, keep in self.chunks():
            flat[start : start + keep.numel()].copy_(keep)


def rank_smallest(scores: Tensor, k: int, *, absolute: bool = False) -> ThresholdMask:
    """:func:`prune_smallest`'s keep-mask (the same entries, ``0 < k < n``) as a :class:`ThresholdMask`: ranked
    in one pass over the chunks (and a sample), with no temporary the size of ``scores``."""
    n = scores.numel()
    assert 0 < k < n, (k, n)
    refuse_nan(scores, "the scores")
    flat = _selectable(scores).reshape(-1)
    kth, below = kth_and_below(flat, k, absolute=absolute)
    return ThresholdMask(flat, tuple(scores.shape), kth, k - below, absolute)


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
