"""The optional C kernels (``_kernels.c``): the compressed-checkpoint decoder, no-grad masked embedding lookups,
the bitmask-storage matrix product.

``pip install`` builds ``_kernels.c`` as an optional extension where a C compiler is (``setup.py``);
this module loads it with ``ctypes`` (no Python API, and ctypes releases the GIL during a call).
:data:`LIB` is None when it was not built: every caller then takes its torch / numpy path, with the
same results. The tests monkeypatch :data:`LIB` to None to run both paths on the same tensors.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import mmap
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor, nn

__all__ = [
    "BITMASK_DTYPES",
    "BITMASK_PAD",
    "LIB",
    "bitmask_isa",
    "bitmask_linear",
    "empty_on_huge_pages",
    "expand",
    "libc_function",
    "mask_row_offsets",
    "masked_bag",
    "masked_rows",
    "pick_index",
    "transformed",
]

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    **{f"fxs_expand{bits}": (_I64, [_P, _I64, _I64, _P, _I64, _P]) for bits in (8, 16, 32, 64)},
    **{f"fxs_masked_bag_{t}": (_INT, [_P, _P, _I64, _I64, _P, _I64, _P, _I64, _I64, _INT, _P]) for t in ("f32", "f64")},
    **{f"fxs_masked_rows_{t}": (_INT, [_P, _P, _I64, _I64, _P, _I64, _P]) for t in ("f32", "f64")},
    **{
        f"fxs_bitmask_linear_{t}": (_INT, [_P, _P, _P, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _I64])
        for t in ("f32", "bf16")
    },
    "fxs_bitmask_isa": (_INT, [_INT]),
    "fxs_bitmask_linear_bf16x1": (_INT, [_P, _P, _P, _I64, _I64, _I64, _P, _P, _P]),
    **{f"fxs_bitmask_pick_{t}": (_INT, [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P]) for t in ("f32", "bf16")},
    "fxs_bitmask_pick_index": (None, [_P, _I64, _I64, _P]),
    "fxs_bitmask_pick_check": (_INT, [_P, _I64, _P, _I64, _I64]),
}


def _load() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(f"_kernels{suffix}")
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
            except (OSError, AttributeError) as err:  # another platform's build, or one older than this code
                warnings.warn(
                    f"fx_sparsify: not using the C kernels in {path.name} ({err}); reinstall "
                    "(pip install -e .) to rebuild them. The torch / numpy paths give the same results",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            lib.fxs_bitmask_isa(-1)  # the CPU check and the AVX2 tables, once, before any thread calls a kernel
            return lib
    return None


#: the loaded library, or None (not built: no C compiler at install)
LIB = _load()


def expand(packed: Tensor, bits: Tensor, target: Tensor) -> int:
    """Decode a packed ``[rows, ceil(cols / 8)]`` mask and the kept entries ``bits`` (an integer view)
    into the integer view ``target`` ``[rows, cols]`` (every entry written); returns the values used
    (-1: the mask marks more entries than there are values). All three contiguous CPU tensors."""
    rows, cols = target.shape
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in (packed, bits, target)), "CPU, contiguous"
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 7) // 8)
    assert bits.element_size() == target.element_size() and not bits.is_floating_point()
    fn = getattr(LIB, f"fxs_expand{8 * bits.element_size()}")
    return int(fn(packed.data_ptr(), rows, cols, bits.data_ptr(), bits.numel(), target.data_ptr()))


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_INDEX = (torch.int32, torch.int64)


def _plain_cpu(t: Tensor) -> bool:
    """A real CPU tensor whose ``data_ptr()`` is its memory: not a subclass (fake, functorch wrapper), not meta."""
    return type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided


def transformed() -> bool:
    """Inside something that traces or transforms the call (compile, export, make_fx, vmap / grad, forward
    AD, a torch function / dispatch mode): the kernels would read no real memory there, so torch's path runs."""
    return (
        torch.compiler.is_compiling()
        or _probe("_len_torch_function_stack") > 0
        or _probe("_len_torch_dispatch_stack") > 0
        or _functorch_level() is not None
        or getattr(_fwad, "_current_level", -1) >= 0
    )


def _probe(name: str) -> int:
    fn = getattr(torch._C, name, None)
    return fn() if fn is not None else 0


def _functorch_level() -> int | None:
    fn = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return fn() if fn is not None else None


def _kernel(kind: str, input: Tensor, weight: Tensor, mask: Tensor, offsets: Tensor | None = None) -> Any:
    """The ``fxs_masked_<kind>_<dtype>`` kernel for these tensors, or None where it does not apply (no
    library, a dtype it lacks, a float mask, a table that is not one contiguous block (the kernels never
    make a table-sized copy), anything but plain CPU tensors, a transform or tracer around the call)."""
    suffix = _SUFFIX.get(weight.dtype)
    if (
        LIB is None
        or suffix is None
        or weight.dim() != 2
        or mask.dtype != torch.bool
        or mask.shape != weight.shape
        or input.dtype not in _INDEX
        or (offsets is not None and offsets.dtype not in _INDEX)
        or not all(_plain_cpu(t) for t in (input, weight, mask) + (() if offsets is None else (offsets,)))
        or not weight.is_contiguous()
        or not mask.is_contiguous()
        or transformed()
    ):
        return None
    return getattr(LIB, f"fxs_masked_{kind}_{suffix}")


class EmbeddingIdError(IndexError, RuntimeError):
    """An id outside the table: an IndexError as ``F.embedding``'s, a RuntimeError as ``F.embedding_bag``'s."""


def _statuses(fn: Any, calls: list[tuple[Any, ...]]) -> list[int]:
    """Run the kernel calls, the first on this thread, the others on the pool; their return values."""
    others = [_pool(len(calls) - 1).submit(fn, *c) for c in calls[1:]] if len(calls) > 1 else []
    try:
        statuses = [fn(*calls[0])]
    finally:  # the pieces write into the caller's tensors: never return (or raise) while one still runs
        wait(others)
    return statuses + [f.result() for f in others]


def _run(fn: Any, calls: list[tuple[Any, ...]], ids: Tensor, rows: int) -> bool:
    """Run the kernel calls (:func:`_statuses`); True when all returned 0. An id outside the table (-2) is an
    :class:`EmbeddingIdError` naming it."""
    statuses = _statuses(fn, calls)
    if -2 in statuses:
        i = int(((ids < 0) | (ids >= rows)).nonzero()[0])
        raise EmbeddingIdError(
            f"embedding: id {int(ids[i])} at position {i} of the input is outside the table: ids must be in [0, {rows})"
        )
    return all(status == 0 for status in statuses)


def masked_rows(input: Tensor, weight: Tensor, mask: Tensor) -> Tensor | None:
    """``F.embedding(input, weight * mask)`` in one pass (each row times its mask row), or None where the
    kernel does not apply (see :func:`_kernel`). For autograd-off calls without ``max_norm`` only
    (``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` change only the gradient)."""
    fn = _kernel("rows", input, weight, mask)
    if fn is None:
        return None
    ids = input.reshape(-1).to(torch.int64).contiguous()
    dim = weight.shape[1]
    out = torch.empty(*input.shape, dim, dtype=weight.dtype, device="cpu")
    calls = [
        (
            weight.data_ptr(),
            mask.data_ptr(),
            weight.shape[0],
            dim,
            ids.data_ptr() + 8 * start,
            end - start,
            out.data_ptr() + out.element_size() * dim * start,
        )
        for start, end in _split(ids.numel(), ids.numel() * dim)
    ]
    _run(fn, calls, ids, weight.shape[0])
    return out


def masked_bag(
    input: Tensor, weight: Tensor, mask: Tensor, offsets: Tensor | None, include_last_offset: bool, mean: bool
) -> Tensor | None:
    """``F.embedding_bag(input, weight * mask, offsets, mode="sum" / "mean")`` in one pass, or None where
    the kernel does not apply (see :func:`_kernel`; also offsets torch must judge): the caller then
    takes the torch path. An id outside the table is an :class:`EmbeddingIdError` naming it. For
    autograd-off calls without ``max_norm``, ``per_sample_weights`` or ``padding_idx`` only."""
    fn = _kernel("bag", input, weight, mask, offsets)
    if fn is None:
        return None
    ids = input.reshape(-1).to(torch.int64).contiguous()
    bounds = None  # a 2-D input: bags of per_bag ids each
    if input.dim() == 2 and offsets is None and input.shape[1] > 0:  # torch refuses bags of no ids
        bags, per_bag = input.shape
    elif input.dim() == 1 and offsets is not None and offsets.dim() == 1 and offsets.numel() > 0:
        bounds = offsets.to(torch.int64)
        if not include_last_offset:
            bounds = torch.cat([bounds, bounds.new_tensor([ids.numel()])])
        # offsets torch must judge (not from 0, decreasing, past the input): its own answer or error. Checked
        # whole, before any piece runs: a piece's rebased offsets cannot see the others'
        if int(bounds[0]) != 0 or int(bounds[-1]) != ids.numel() or bool((bounds[1:] < bounds[:-1]).any()):
            return None
        bags, per_bag = bounds.numel() - 1, 0
        bounds = bounds.contiguous()
    else:
        return None
    dim = weight.shape[1]
    out = torch.empty(bags, dim, dtype=weight.dtype, device="cpu")
    pieces = _split(bags, ids.numel() * dim)
    calls, keep = [], []
    for start, end in pieces:  # bags [start, end): their ids, rebased offsets and rows of out
        if bounds is None:
            first, count, piece_bounds = start * per_bag, (end - start) * per_bag, None
        else:
            piece_bounds = bounds[start : end + 1] - bounds[start] if len(pieces) > 1 else bounds
            first = int(bounds[start]) if len(pieces) > 1 else 0
            count = int(piece_bounds[-1])
            keep.append(piece_bounds)
        calls.append(
            (
                weight.data_ptr(),
                mask.data_ptr(),
                weight.shape[0],
                dim,
                ids.data_ptr() + 8 * first,
                count,
                None if piece_bounds is None else piece_bounds.data_ptr(),
                end - start,
                per_bag,
                int(mean),
                out.data_ptr() + out.element_size() * dim * start,
            )
        )
    return out if _run(fn, calls, ids, weight.shape[0]) else None


#: entries (ids x dim) from which a lookup is split across torch.get_num_threads() threads: below
#: ~0.5 ms of work the hand-off to a pool thread costs more than it saves (measured on 2 cores)
PARALLEL_WORK = 1 << 21


def _split(units: int, work: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``units`` (ids or bags), one per thread where the work pays for the hand-off."""
    threads = min(torch.get_num_threads(), units) if work >= PARALLEL_WORK else 1
    edges = [units * i // max(threads, 1) for i in range(threads + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a] or [(0, units)]


_POOLS: dict[int, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool of that size, made once (ctypes releases the GIL: the pieces run in parallel)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fx_sparsify")
    return _POOLS[threads]


# --- bitmask storage: y = x @ W^T + b ---------------------------------------------------------------------
#: value dtypes the bitmask kernel takes (the sums are float32 either way)
BITMASK_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
#: entries the values tensor must hold past the last kept one (the vector paths load whole 16-wide groups)
BITMASK_PAD = 32
#: the kernel paths by number (:func:`bitmask_isa`)
ISAS = ("portable", "avx2", "avx512", "avx512vbmi2")


#: buffers of at least this many bytes are asked for transparent huge pages (:func:`empty_on_huge_pages`)
HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def libc_function(name: str, argtypes: tuple[Any, ...], restype: Any) -> Any:
    """The C library's function ``name`` with that ctypes signature, on Linux where the C library has it
    (``madvise``; glibc's ``malloc_trim``, ``mallopt``); None elsewhere. Looked up among the symbols the
    process has loaded (no ``find_library`` subprocess), once per name."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # another C library (musl lacks malloc_trim)
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


_MADVISE = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)


def empty_on_huge_pages(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D CPU tensor whose pages are asked (``madvise(MADV_HUGEPAGE)``, before anything is
    written to them) to be transparent huge pages, on Linux and from :data:`HUGE_PAGE_MIN_BYTES`; else a plain
    ``torch.empty``. The memory is a fresh anonymous mapping: memory the allocator reuses is already in small
    pages, which the hint does not change (a 5 MiB buffer made after larger ones were freed got none). The
    bitmask kernel's loads of values follow the mask, so a TLB miss holds up the loads behind it instead of
    overlapping them: on 2 MiB pages the float32 11008x4096 layer at 50 % zeros ran at ~0.56x dense
    ``F.linear`` instead of ~0.84x (AMD Zen 4, 1 thread). Where the kernel refuses (THP set to ``never``) the
    pages stay ordinary: nothing else changes."""
    nbytes = numel * dtype.itemsize
    if _MADVISE is None or nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(numel, dtype=dtype)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # freed with the last tensor on it
    t = torch.frombuffer(area, dtype=dtype, count=numel)
    _MADVISE(t.data_ptr(), -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE, _MADV_HUGEPAGE)  # a hint: result unused
    return t


def bitmask_isa(want: str | None = None) -> str | None:
    """The path the bitmask kernel takes: ``"avx512vbmi2"`` (AVX-512 with VBMI2, and the bfloat16 row path where the
    CPU has AVX512_BF16), ``"avx512"``, ``"avx2"`` or ``"portable"`` (C without SIMD), None without the library.
    Both AVX-512 paths take the pick path at batch 1 where a layer has a pick index (:func:`pick_index`). ``want``
    switches to that path where the CPU has it (the tests force the portable one to check it gives the same
    results; the CPU's best path is the default)."""
    if LIB is None:
        return None
    if want is not None and want not in ISAS:
        raise ValueError(f"bitmask_isa({want!r}): use one of {', '.join(map(repr, ISAS))}")
    return ISAS[int(LIB.fxs_bitmask_isa(ISAS.index(want) if want is not None else -1))]


def pick_index(mask: Tensor, cols: int) -> Tensor | None:
    """The pick index of a ``[rows, ceil(cols / 8)]`` packed mask (None without the library): uint8, for each
    tile of four rows (the last: the rows left) and each 64-column window, the tile's rows' kept entries in the
    window (a byte a row), then each row's kept entries' columns within the window (0-63, a byte each); then
    :data:`BITMASK_PAD` zeros. With it, batch-1 products of a sparse layer take the pick path
    (:func:`bitmask_linear`): x's entries at the kept columns are picked instead of the values being expanded to
    every column. One byte per kept entry and per 64 columns of a row."""
    if LIB is None or mask.device.type != "cpu" or mask.dtype != torch.uint8 or mask.dim() != 2:
        return None
    rows, windows = mask.shape[0], -(-cols // 64)
    kept = int(mask_row_offsets(mask, cols)[-1])
    out = empty_on_huge_pages(rows * windows + kept + BITMASK_PAD, torch.uint8)  # read along with the values
    out[-BITMASK_PAD:] = 0
    LIB.fxs_bitmask_pick_index(mask.contiguous().data_ptr(), rows, cols, out.data_ptr())
    return out


def _pick_agrees(pick: Tensor, row_offsets: Tensor, cols: int) -> bool:
    """Whether ``pick`` is laid out as the pick index of those rows: each window's counts add up to each row's kept
    entries, within the index's size (the kernel trusts them for every load; the columns in it are only used for
    their low 6 bits). Checked in C, once per (tensor, version), like the offsets."""
    key = (pick.data_ptr(), row_offsets.data_ptr())
    stamp = (_version(pick), _version(row_offsets), pick.numel(), cols)
    if _AGREED.get(key) == stamp:
        return True
    if pick.dtype != torch.uint8 or pick.dim() != 1 or not pick.is_contiguous() or LIB is None:
        return False
    n = pick.numel() - BITMASK_PAD
    if n < 0 or LIB.fxs_bitmask_pick_check(pick.data_ptr(), n, row_offsets.data_ptr(), row_offsets.numel() - 1, cols):
        return False
    _AGREED[key] = stamp
    return True


def bitmask_linear(
    x: Tensor, values: Tensor, mask: Tensor, row_offsets: Tensor, bias: Tensor | None, pick: Tensor | None = None
) -> Tensor | None:
    """``x @ W.T + bias`` in float32 for the ``[rows, cols]`` weight W held as ``values`` (its kept entries,
    row-major, :data:`BITMASK_PAD` more after the last), ``mask`` (uint8 ``[rows, ceil(cols / 8)]``, least
    significant bit first) and ``row_offsets`` (int64 ``[rows + 1]``: where each row starts in ``values``,
    the last is the count). ``x`` is ``[batch, cols]``. With the mask's ``pick`` index (:func:`pick_index`),
    one row of x takes the pick path where the CPU has AVX-512. Returns None where the kernel does not apply
    (no library, another dtype or device, a tracer, shapes that disagree): the caller takes the torch path.
    The rows are split across ``torch.get_num_threads()`` threads for large products."""
    suffix = BITMASK_DTYPES.get(values.dtype)
    if LIB is None or suffix is None or x.dim() != 2 or mask.dim() != 2 or row_offsets.dim() != 1:
        return None
    rows, cols = mask.shape[0], x.shape[1]
    tensors = (x, values, mask, row_offsets) + (() if bias is None else (bias,))
    if (
        mask.dtype != torch.uint8
        or mask.shape[1] != (cols + 7) // 8
        or row_offsets.dtype != torch.int64
        or row_offsets.numel() != rows + 1
        or values.dim() != 1
        or not x.is_floating_point()
        or (bias is not None and bias.shape != (rows,))
        or not all(_plain_cpu(t) for t in tensors)
        or transformed()
    ):
        return None
    if not (values.is_contiguous() and mask.is_contiguous() and row_offsets.is_contiguous()):
        return None
    if not _offsets_agree(values, mask, row_offsets, cols):
        return None
    if values.dtype == x.dtype == torch.bfloat16 and x.shape[0] == 1:  # vdpbf16ps where the CPU has it
        out = _bf16_row(x, values, mask, row_offsets, bias, rows, cols)
        if out is not None:
            return out
    x32 = x.to(torch.float32)
    if x32.stride(1) != 1 and cols > 1:  # rows of x may be apart (a view), their entries must be adjacent
        x32 = x32.contiguous()
    b32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if x32.shape[0] == 1 and pick is not None and _plain_cpu(pick) and _pick_agrees(pick, row_offsets, cols):
        out = _picked(x32, values, pick, row_offsets, b32, rows, cols)
        if out is not None:
            return out
    batch = x32.shape[0]
    out = torch.empty(batch, rows, dtype=torch.float32, device="cpu")
    pieces = _split(rows, max(batch, 1) * rows * cols)
    fn = getattr(LIB, f"fxs_bitmask_linear_{suffix}")
    calls: list[tuple[Any, ...]] = [
        (
            values.data_ptr(),
            row_offsets.data_ptr(),
            mask.data_ptr(),
            cols,
            a,
            b,
            x32.data_ptr(),
            batch,
            x32.stride(0),
            None if b32 is None else b32.data_ptr(),
            out.data_ptr(),
            rows,
        )
        for a, b in pieces
    ]
    return out if all(s == 0 for s in _statuses(fn, calls)) else None


#: (mask, offsets) checked against each other: their data pointers and versions, so a changed tensor is checked again
_AGREED: dict[tuple[int, int], tuple[int, ...]] = {}
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def mask_row_offsets(mask: Tensor, cols: int) -> Tensor:
    """int64 ``[rows + 1]``: where each row of a packed ``[rows, ceil(cols / 8)]`` mask starts among the kept
    values (bits past ``cols`` ignored). Works on the mask's bytes, a block of rows at a time."""
    rows = mask.shape[0]
    tail = (1 << (cols % 8)) - 1 if cols % 8 else 0xFF
    counts = torch.zeros(rows, dtype=torch.int64)
    for r0 in range(0, rows, 4096):  # a block of rows at a time: the temporaries stay small
        block = mask[r0 : r0 + 4096].clone()
        if block.shape[1]:
            block[:, -1] &= tail
        counts[r0 : r0 + 4096] = _POPCOUNT.index_select(0, block.reshape(-1).int()).view(block.shape[0], -1).sum(dim=1)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def _version(t: Tensor) -> int:
    """``t._version``; -1 for an inference tensor (made under ``torch.inference_mode``), which counts none: the
    layers' buffers are replaced, never written in place, so such a pair is checked once."""
    return -1 if t.is_inference() else t._version


def _offsets_agree(values: Tensor, mask: Tensor, row_offsets: Tensor, cols: int) -> bool:
    """Whether ``row_offsets`` are the running counts of the mask's rows (bits past ``cols`` ignored) and
    ``values`` holds them all plus the padding: the kernel trusts them for every load. Checked once per
    (tensor, version): the check reads the whole mask, ~1/8 byte an entry."""
    key = (mask.data_ptr(), row_offsets.data_ptr())
    stamp = (_version(mask), _version(row_offsets), values.numel(), cols, mask.shape[0])
    if _AGREED.get(key) == stamp:
        return True
    want = mask_row_offsets(mask, cols)
    if not torch.equal(want, row_offsets) or values.numel() < int(want[-1]) + BITMASK_PAD:
        return False
    if len(_AGREED) > 4096:
        _AGREED.clear()
    _AGREED[key] = stamp
    return True


def _bf16_row(
    x: Tensor, values: Tensor, mask: Tensor, row_offsets: Tensor, bias: Tensor | None, rows: int, cols: int
) -> Tensor | None:
    """One bfloat16 row of x against bfloat16 values with AVX512_BF16 (None where the CPU lacks it)."""
    xr = x.contiguous()
    b32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    out = torch.empty(1, rows, dtype=torch.float32, device="cpu")
    fn = getattr(LIB, "fxs_bitmask_linear_bf16x1")  # noqa: B009 (LIB is Optional; the caller checked it)
    calls: list[tuple[Any, ...]] = [
        (
            values.data_ptr(),
            row_offsets.data_ptr(),
            mask.data_ptr(),
            cols,
            a,
            b,
            xr.data_ptr(),
            None if b32 is None else b32.data_ptr(),
            out.data_ptr(),
        )
        for a, b in _split(rows, rows * cols)
    ]
    return out if all(s == 0 for s in _statuses(fn, calls)) else None


def _picked(
    x: Tensor, values: Tensor, pick: Tensor, row_offsets: Tensor, bias: Tensor | None, rows: int, cols: int
) -> Tensor | None:
    """One float32 row of x by the pick path (None where the path in use lacks AVX-512); the threads take whole
    tiles of four rows."""
    out = torch.empty(1, rows, dtype=torch.float32, device="cpu")
    fn = getattr(LIB, f"fxs_bitmask_pick_{BITMASK_DTYPES[values.dtype]}")
    calls: list[tuple[Any, ...]] = [
        (
            values.data_ptr(),
            pick.data_ptr(),
            row_offsets.data_ptr(),
            rows,
            cols,
            4 * a,
            min(4 * b, rows),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
        )
        for a, b in _split(-(-rows // 4), rows * cols)
    ]
    return out if all(s == 0 for s in _statuses(fn, calls)) else None
