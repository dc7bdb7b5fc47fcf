"""Several processes (SPEC §19): the one module of fx_sparsify that knows about ranks.

Under an initialised ``torch.distributed`` process group (any backend: gloo on CPUs, NCCL on GPUs;
``torchrun`` or ``init_process_group`` by hand) with more than one rank:

- **Statistics are all-reduced with their sample counts** (:func:`sync_observers`): every observer a
  ``step()`` reads (activation observers, Wanda's input norms, SparseGPT's Hessians, also those a
  ``"sequential": true`` level re-collects) is summed over the ranks (``max`` / ``abs_max`` take the
  maximum), and its row and batch counts are summed, so each rank may calibrate on its own batches and
  every rank then holds the statistic of one process that saw all of them. A rank that saw no batch
  takes part with an empty statistic.
- **Heavy solves are split** (:func:`solve_split`): each item (a SparseGPT layer, a reconstruction)
  goes to one rank, balanced by its cost (:func:`assign`, longest first onto the least loaded rank,
  as llm-compressor balances GPTQ by Hessian size); each rank solves its own items, and every result is
  broadcast from its owner, so all ranks end with the same masks and weights. An error on any rank is
  raised on every rank (no rank is left waiting in a collective).
- **Streamed pruning** (:mod:`fx_sparsify.streamed`) gives each rank its share of the calibration
  batches (:func:`local_share`); rank 0 writes the files (:func:`is_writer`).

Without a process group (or with one rank) every function here is the single-process identity:
nothing is communicated. Every rank must call these functions in the same order with the same items.

    >>> owners = assign([9.0, 1.0, 4.0, 4.0], world=2)   # item -> rank
    >>> owners
    [0, 1, 1, 1]
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from .observer import ActivationObserver

__all__ = [
    "active",
    "rank",
    "world_size",
    "is_writer",
    "barrier",
    "local_share",
    "sync_observers",
    "all_reduce_sum",
    "assign",
    "solve_split",
    "raise_together",
]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

_MAX_AGGREGATES = ("max", "abs_max")  # statistics combined by maximum; every other one is summed


def _dist() -> object | None:
    """``torch.distributed`` when a process group of more than one rank is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def active() -> bool:
    """Whether an initialised ``torch.distributed`` process group has more than one rank."""
    return _dist() is not None


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0  # type: ignore[attr-defined]


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1  # type: ignore[attr-defined]


def is_writer() -> bool:
    """Whether this rank writes shared files (rank 0; the only process without a group)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()  # type: ignore[attr-defined]


def local_share(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of ``items``: item ``i`` goes to rank ``i % world_size()`` (all of them alone)."""
    world, me = world_size(), rank()
    for i, item in enumerate(items):
        if i % world == me:
            yield item


def _gather(value: object) -> list[object]:
    """``value`` of every rank, in rank order."""
    dist = _dist()
    if dist is None:
        return [value]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, value)  # type: ignore[attr-defined]
    return out


def raise_together(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank had an error (the first rank's, as a ``ValueError``).

    Call it after work that may fail on one rank only, before the next collective, so no rank is left
    waiting for one that gave up. Without a process group, raises ``error`` itself (if any).
    """
    if not active():
        if error is not None:
            raise error
        return
    errors = _gather(None if error is None else (type(error).__name__, str(error)))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, first = failed[0]
    raise ValueError(f"rank {r} failed ({first[0]}): {first[1]}")  # type: ignore[index]


def _wide(t: Tensor) -> Tensor:
    """``t`` in a dtype every backend reduces exactly enough (half types are summed in float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (for statistics that are plain sums, e.g. counts)."""
    dist = _dist()
    if dist is None:
        return
    for t in tensors:
        wide = _wide(t)
        dist.all_reduce(wide)  # type: ignore[attr-defined]
        if wide is not t:
            t.copy_(wide)


def _meta(t: Tensor | None) -> tuple[tuple[int, ...], str] | None:
    return None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))


def sync_observers(observers: Iterable[ActivationObserver]) -> None:
    """All-reduce each observer's statistic and its counts over the ranks (collective; in order).

    Every rank passes the same observers in the same order. Afterwards each holds what one process
    that saw every rank's batches would hold (sums up to float rounding: the ranks' partial sums are
    added in another order). An observer class may name further summed tensors in ``summed`` (a
    tuple of attribute names, None where a rank has none yet). A ``ValueError`` names an observer
    whose statistic has different shapes on different ranks (per-sample statistics of batches of
    different shapes).
    """
    dist = _dist()
    if dist is None:
        return
    observers = list(observers)
    mine = [
        (int(o.batches), int(o.samples), _meta(o.stat), [_meta(getattr(o, a, None)) for a in getattr(o, "summed", ())])
        for o in observers
    ]
    everyone = _gather(mine)
    for i, o in enumerate(observers):
        entries = [ranks[i] for ranks in everyone]  # type: ignore[index]
        seen = [e for e in entries if e[0] > 0]
        if seen:
            shapes = {e[2] for e in seen}
            if len(shapes) > 1:
                raise ValueError(
                    f"observer {o.name!r} holds statistics of shapes {sorted(shapes)} on different ranks; "
                    "calibrate every rank with batches of one shape"
                )
            maximum = isinstance(o.aggregate, str) and o.aggregate in _MAX_AGGREGATES
            o.stat = _reduced(dist, o.stat if o.batches else None, seen[0][2], o.stat.device, maximum)
            o.batches = sum(e[0] for e in entries)
            o.samples = sum(e[1] for e in entries)
        for k, attr in enumerate(getattr(o, "summed", ())):
            held = next((e[3][k] for e in entries if e[3][k] is not None), None)
            if held is not None:
                setattr(o, attr, _reduced(dist, getattr(o, attr, None), held, o.stat.device, False))


def _reduced(
    dist: Any, t: Tensor | None, meta: tuple[tuple[int, ...], str], device: torch.device, maximum: bool
) -> Tensor:
    """``t`` reduced over the ranks; a rank without it takes part with the reduction's identity."""
    if t is None:
        t = torch.full(meta[0], -math.inf if maximum else 0.0, dtype=getattr(torch, meta[1]), device=device)
    wide = _wide(t)
    dist.all_reduce(wide, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
    if wide is not t:
        t.copy_(wide)
    return t


def assign(costs: Sequence[float], world: int | None = None) -> list[int]:
    """The rank that solves each item: the costliest first, each onto the rank with the least work so far.

    Ties go to the lower rank, so every rank computes the same assignment.
    """
    world = world_size() if world is None else world
    load = [(0.0, r) for r in range(world)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        total, r = heapq.heappop(load)
        owners[i] = r
        heapq.heappush(load, (total + float(costs[i]), r))
    return owners


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def solve_split(
    keys: Sequence[K],
    costs: Sequence[float],
    solve: Callable[[K], Sequence[Tensor]],
    template: Callable[[K], Sequence[Tensor]],
) -> dict[K, list[Tensor]]:
    """``{key: solve(key)}`` with each key solved on one rank (:func:`assign`) and broadcast to all.

    ``template(key)`` returns empty tensors of the results' shapes and dtypes (a receiving rank's buffers);
    results are sent as their bytes, so any dtype travels on any backend. An error raised by ``solve``
    on any rank is raised on every rank (see :func:`raise_together`). Without a process group, simply
    ``solve`` of each key in order.
    """
    dist = _dist()
    if dist is None:
        return {k: list(solve(k)) for k in keys}
    owners = assign(costs)
    me = rank()
    results: dict[K, list[Tensor]] = {}
    error: BaseException | None = None
    for k, owner in zip(keys, owners):
        if owner == me and error is None:
            try:
                results[k] = [t.contiguous() for t in solve(k)]
            except Exception as err:  # raised on every rank below
                error = err
    raise_together(error)
    for k, owner in zip(keys, owners):
        if owner != me:
            results[k] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in template(k)]
        for t in results[k]:
            if t.numel():
                dist.broadcast(_as_bytes(t), src=owner)  # type: ignore[attr-defined]
    return {k: results[k] for k in keys}
