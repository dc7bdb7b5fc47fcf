"""The optional C kernels (``_kernels.c``): the compressed-checkpoint decoder and the no-grad masked bag.

``pip install`` builds ``_kernels.c`` as an optional extension where a C compiler is (``setup.py``);
this module loads it with ``ctypes`` (no Python API, and ctypes releases the GIL during a call).
:data:`LIB` is None when it was not built: every caller then takes its torch / numpy path, with the
same results. The tests monkeypatch :data:`LIB` to None to run both paths on the same tensors.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LIB", "expand", "masked_bag"]

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    **{f"fxs_expand{bits}": (_I64, [_P, _I64, _I64, _P, _I64, _P]) for bits in (8, 16, 32, 64)},
    **{f"fxs_masked_bag_{t}": (_INT, [_P, _P, _I64, _I64, _P, _I64, _P, _I64, _I64, _INT, _P]) for t in ("f32", "f64")},
}


def _load() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(f"_kernels{suffix}")
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:  # pragma: no cover - a library built for another platform
                return None
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            return lib
    return None


#: the loaded library, or None (not built: no C compiler at install)
LIB = _load()


def expand(packed: Tensor, bits: Tensor, target: Tensor) -> int:
    """Decode a packed ``[rows, ceil(cols / 8)]`` mask and the kept entries ``bits`` (an integer view)
    into the integer view ``target`` ``[rows, cols]`` (every entry written); returns the values used
    (-1: the mask marks more entries than there are values). All three contiguous CPU tensors."""
    rows, cols = target.shape
    fn = getattr(LIB, f"fxs_expand{8 * bits.element_size()}")
    return int(fn(packed.data_ptr(), rows, cols, bits.data_ptr(), bits.numel(), target.data_ptr()))


_BAG = {torch.float32: "fxs_masked_bag_f32", torch.float64: "fxs_masked_bag_f64"}


def masked_bag(input: Tensor, weight: Tensor, mask: Tensor, offsets: Tensor | None, include_last_offset: bool,
               mean: bool) -> Tensor | None:
    """``F.embedding_bag(input, weight * mask, offsets, mode="sum" / "mean")`` in one pass, or None where
    the kernel does not apply (no library, a dtype or device it lacks, offsets torch must judge): the
    caller then takes the torch path. An id outside the table is a RuntimeError naming it (as torch's
    is a RuntimeError). For autograd-off calls only."""
    name = _BAG.get(weight.dtype)
    if (LIB is None or name is None or weight.device.type != "cpu" or weight.dim() != 2 or mask.dtype != torch.bool
            or mask.shape != weight.shape or not weight.is_contiguous() or not mask.is_contiguous()
            or input.dtype not in (torch.int32, torch.int64)):
        return None
    bounds = None  # a 2-D input: bags of per_bag ids each
    if input.dim() == 2 and offsets is None and input.shape[1] > 0:  # torch refuses bags of no ids
        bags, per_bag = input.shape
    elif input.dim() == 1 and offsets is not None and offsets.dim() == 1 and offsets.numel() > 0:
        bounds = offsets.to(torch.int64)
        if not include_last_offset:
            bounds = torch.cat([bounds, bounds.new_tensor([input.numel()])])
        bags, per_bag = bounds.numel() - 1, 0
        bounds = bounds.contiguous()
    else:
        return None
    ids = input.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(bags, weight.shape[1], dtype=weight.dtype)
    fn, dim = getattr(LIB, name), weight.shape[1]
    pieces = _split(bags, ids.numel() * dim)
    if len(pieces) > 1 and bounds is not None and (int(bounds[0]) != 0 or int(bounds[-1]) != ids.numel()):
        return None  # offsets torch must judge (each piece is checked alone below)
    calls, keep = [], []
    for start, end in pieces:  # bags [start, end): their ids, rebased offsets and rows of out
        if bounds is None:
            first, count, piece_bounds = start * per_bag, (end - start) * per_bag, None
        else:
            piece_bounds = bounds[start:end + 1] - bounds[start] if len(pieces) > 1 else bounds
            first = int(bounds[start]) if len(pieces) > 1 else 0
            count = int(piece_bounds[-1])
            keep.append(piece_bounds)
        calls.append((weight.data_ptr(), mask.data_ptr(), weight.shape[0], dim, ids.data_ptr() + 8 * first, count,
                      None if piece_bounds is None else piece_bounds.data_ptr(), end - start, per_bag, int(mean),
                      out.data_ptr() + out.element_size() * dim * start))
    others = [_pool(len(calls) - 1).submit(fn, *c) for c in calls[1:]] if len(calls) > 1 else []
    statuses = [fn(*calls[0])] + [f.result() for f in others]  # this thread takes the first piece
    if -2 in statuses:
        i = int(((ids < 0) | (ids >= weight.shape[0])).nonzero()[0])
        raise RuntimeError(f"embedding_bag: id {int(ids[i])} at position {i} of the input is outside the table: ids "
                           f"must be in [0, {weight.shape[0]})")
    return out if all(status == 0 for status in statuses) else None


#: entries (ids x dim) from which a bag lookup is split across torch.get_num_threads() threads: below
#: ~0.5 ms of work the hand-off to a pool thread costs more than it saves (measured on 2 cores)
PARALLEL_WORK = 1 << 21


def _split(bags: int, work: int) -> list[tuple[int, int]]:
    """Contiguous bag ranges, one per thread where the work is large enough to pay for the hand-off."""
    threads = min(torch.get_num_threads(), bags) if work >= PARALLEL_WORK else 1
    edges = [bags * i // max(threads, 1) for i in range(threads + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a] or [(0, bags)]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool of that size, made once (ctypes releases the GIL: the pieces run in parallel)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fx_sparsify")
    return _POOLS[threads]
