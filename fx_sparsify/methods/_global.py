"""Global ranking over several tensors without concatenating them (SPEC §15).

``prune_smallest_many(tensors, k)`` is ``prune_smallest(torch.cat([t.reshape(-1) for t in tensors]), k)``
split back per tensor (the same masks: ties are pruned lowest index of the concatenation first), but
its temporaries are a chunk and the band of values near the threshold, not a copy of every tensor.
:func:`global_masks` ranks a global rule's scores with any method: those of :data:`MANY_RANKERS` without
concatenating, the others as one flattened float32 tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from .._masks import PendingMask
from .._threads import serial_below
from . import _selectors
from ._random import generator_for
from ._registry import get_mask_method
from ._selectors import ThresholdMask, count_to_prune, prune_smallest, ranked_chunks, refuse_nan

__all__ = ["prune_smallest_many", "rank_smallest_many", "global_masks", "MANY_RANKERS"]


def _abs(t: Tensor, absolute: bool) -> Tensor:
    return t.abs() if absolute else t


def _kth_many(flats: list[Tensor], k: int, absolute: bool) -> Tensor:
    """The exact k-th smallest value (1-based) over all of ``flats`` (of ``|x|`` when ``absolute``)."""
    sizes = [f.numel() for f in flats]
    n = sum(sizes)
    device = flats[0].device
    gen = torch.Generator(device=device)
    gen.manual_seed(0x5EED)
    idx = torch.randint(n, (_selectors.SAMPLE,), generator=gen, device=device)
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]], device=device)
    owner = torch.bucketize(idx, starts, right=True) - 1
    sample = torch.cat([_abs(f[idx[owner == i] - starts[i]], absolute).float() for i, f in enumerate(flats)])
    lo, hi = _selectors.bracket(torch.sort(sample).values, k / n)
    if lo is not None or hi is not None:
        chunks = (chunk for f in flats for chunk in ranked_chunks(f, absolute, torch.float32))
        found = _selectors.kth_in_band(chunks, k, lo, hi)
        if found is not None:
            return found[0]
    return torch.kthvalue(torch.cat([_abs(f, absolute).float() for f in flats]), k).values  # rare: a missed bracket


def prune_smallest_many(tensors: list[Tensor], k: int, *, absolute: bool = False) -> list[Tensor]:
    """Keep-masks pruning exactly the ``k`` smallest entries across ``tensors`` (of ``|x|`` when ``absolute``).

    Values are compared as float32, as a concatenation cast to float32 would be. NaN is refused.
    """
    with serial_below(sum(t.numel() for t in tensors)):  # element-wise passes: one thread unless very large
        return _prune_smallest_many(tensors, k, absolute)


def _prune_smallest_many(tensors: list[Tensor], k: int, absolute: bool) -> list[Tensor]:
    n = sum(t.numel() for t in tensors)
    assert 0 <= k <= n, (k, n)
    if len(tensors) == 1 or n <= _selectors.SMALL or k in (0, n):
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        keep = prune_smallest(flat.abs() if absolute else flat, k)
        return [part.view(t.shape) for t, part in zip(tensors, keep.split([t.numel() for t in tensors]))]
    for t in tensors:
        refuse_nan(t, "the scores")
    flats = [t.reshape(-1) for t in tensors]
    kth = _kth_many(flats, k, absolute)
    keeps, below = [], 0
    for f in flats:
        keep = torch.empty(f.numel(), dtype=torch.bool, device=f.device)
        for chunk, out in zip(f.split(_selectors.CHUNK), keep.split(_selectors.CHUNK)):
            torch.lt(_abs(chunk, absolute).float(), kth, out=out).logical_not_()
        below += f.numel() - int(torch.count_nonzero(keep))
        keeps.append(keep)
    need = k - below  # entries equal to kth to prune, lowest index of the concatenation first
    pairs = (
        (_abs(chunk, absolute).float(), kept)
        for f, keep in zip(flats, keeps)
        for chunk, kept in zip(f.split(_selectors.CHUNK), keep.split(_selectors.CHUNK))
    )
    _selectors.prune_first_ties(pairs, kth, need)
    return [keep.view(t.shape) for t, keep in zip(tensors, keeps)]


def rank_smallest_many(tensors: list[Tensor], k: int, *, absolute: bool = False) -> list[Tensor | PendingMask]:
    """:func:`prune_smallest_many`'s masks (the same entries), those of a large group each as a
    :class:`~fx_sparsify.methods._selectors.ThresholdMask` (the shared k-th value and the ties this tensor prunes):
    nothing of the tensors' size is made until a mask is written."""
    n = sum(t.numel() for t in tensors)
    assert 0 <= k <= n, (k, n)
    if n <= _selectors.SMALL or k in (0, n):
        return list(prune_smallest_many(tensors, k, absolute=absolute))
    with serial_below(n):
        for t in tensors:
            refuse_nan(t, "the scores")
        flats = [t.reshape(-1) for t in tensors]
        kth = _kth_many(flats, k, absolute)
        below, ties = 0, []
        for f in flats:
            tied = 0
            for values in ranked_chunks(f, absolute, torch.float32):  # compared as float32, as the concatenation
                below += int(torch.count_nonzero(torch.lt(values, kth)))
                tied += int(torch.count_nonzero(torch.eq(values, kth)))
            ties.append(tied)
    need = k - below  # ties pruned lowest index of the concatenation first: the earlier tensors' first
    masks: list[Tensor | PendingMask] = []
    for f, t, tied in zip(flats, tensors, ties):
        take = min(tied, need)
        need -= take
        masks.append(ThresholdMask(f, tuple(t.shape), kth, take, absolute, dtype=torch.float32))
    return masks


def _l1_many(scores: list[Tensor], options: Mapping[str, Any], compact: bool) -> list[Tensor | PendingMask]:
    k = count_to_prune(options["sparsity"], sum(t.numel() for t in scores))
    if compact:
        return rank_smallest_many(scores, k, absolute=True)
    return list(prune_smallest_many(scores, k, absolute=True))


#: methods that rank several tensors together without concatenating them: method -> (scores, options, compact) ->
#: masks (``compact``: large groups may come back as :class:`PendingMask` es)
MANY_RANKERS: dict[str, Callable[[list[Tensor], Mapping[str, Any], bool], list[Tensor | PendingMask]]] = {
    "l1_unstructured": _l1_many
}


def global_masks(
    method: str,
    scores: Iterable[Tensor],
    sizes: list[int],
    options: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    compact: bool = False,
) -> list[Any]:
    """Keep-masks of ``scores`` (one tensor per target, ``sizes`` entries each) ranked together as one tensor.

    The parts come back flat, one per target in order (``compact=True``: a method of :data:`MANY_RANKERS` may
    return a large group's masks as :class:`PendingMask` es of the scores' shapes, made when written). A method
    without a row in :data:`MANY_RANKERS` ranks the concatenation of the scores as float32, with a generator
    seeded from ``seed`` and ``name``.
    """
    many = MANY_RANKERS.get(method)
    if many is not None:
        return [p.reshape(-1) if isinstance(p, Tensor) else p for p in many(list(scores), options, compact)]
    flat = torch.cat([t.reshape(-1).float() for t in scores])
    keep = get_mask_method(method)(flat, generator=generator_for(seed, name, flat.device), **options)
    return list(keep.split(sizes))
