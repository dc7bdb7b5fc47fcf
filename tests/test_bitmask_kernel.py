"""The bitmask kernel (``_kernels.c`` via ``_native.bitmask_linear`` and the custom op) against ``F.linear`` of
the dense weight, on every path the CPU has (AVX-512, AVX2, portable C), with threads, and the torch path.

Tolerance: the kernel sums in another order than ``F.linear``, in float32 for float32 and bfloat16 values;
results are compared with a float64 reference at ``rtol=1e-5``, ``atol=1e-5 * sqrt(cols)`` (float32)
and at ``rtol=atol=1e-2`` after rounding to bfloat16 (one bfloat16 step is 2**-8 relative).
"""

from __future__ import annotations

import copy as copy_module
import ctypes
import math
import mmap
import pickle
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fx_sparsify import _native
from fx_sparsify._bitmask import BitmaskLinear, dense_of, pack

needs_lib = pytest.mark.skipif(_native.LIB is None, reason="the C kernels are not built (no C compiler at install)")


def _paths() -> list[str]:
    """The kernel paths this CPU can run (the best one first)."""
    if _native.LIB is None:
        return []
    best = _native.bitmask_isa()
    paths = [best] + [p for p in ("avx512", "avx2", "portable") if p != best]
    return [p for p in paths if _native.ISAS.index(p) <= _native.ISAS.index(best)]


@pytest.fixture(params=_paths() or ["none"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kernel test on each path the CPU has; the CPU's own path again afterwards."""
    if request.param == "none":
        pytest.skip("the C kernels are not built")
    best = _native.bitmask_isa()
    assert _native.bitmask_isa(request.param) == request.param
    yield request.param
    _native.bitmask_isa(best)


def _weight(
    rows: int, cols: int, zeros: float, dtype: torch.dtype, seed: int = 0, empty_rows: tuple[int, ...] = ()
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) >= zeros)
    w[list(empty_rows)] = 0
    return w.to(dtype)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    if w.dtype == torch.bfloat16:
        torch.testing.assert_close(y.to(torch.bfloat16).float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, math.sqrt(w.shape[1])))


def _run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The kernel's product without a pick index (checked here) and with one (returned: at batch 1 on AVX-512 the
    pick path, else the same paths again)."""
    values, mask, offsets = pack(w)
    y = _native.bitmask_linear(x, values, mask, offsets, b)
    assert y is not None and y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0])
    _check(y, x, w, b)
    pick = _native.pick_index(mask, w.shape[1])
    if w.dtype == torch.bfloat16:  # bfloat16 values with a float32 x: the float32 paths, pick path included
        y = _native.bitmask_linear(x.float(), values, mask, offsets, b, pick)
        assert y is not None
        _check(y, x, w, b)
    y = _native.bitmask_linear(x, values, mask, offsets, b, pick)
    assert y is not None and y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0])
    return y


SHAPES = [
    (1, 1),
    (3, 7),
    (8, 8),
    (17, 33),
    (64, 64),
    (5, 130),
    (40, 257),
    (129, 1000),
    (6, 4103),
]  # 4103: batch 1 in tiles


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_kernel_equals_f_linear_on_every_path(
    shape: tuple[int, int], zeros: float, dtype: torch.dtype, isa: str
) -> None:
    rows, cols = shape
    w = _weight(rows, cols, zeros, dtype, seed=rows * cols, empty_rows=(0,) if rows > 2 else ())
    b = torch.randn(rows).to(dtype)
    for batch in (0, 1, 2, 5, 9, 17):  # 9 and 17: past the 8 rows of x the AVX-512 path shares a step with
        x = torch.randn(batch, cols).to(dtype)
        _check(_run(x, w, b), x, w, b)
    _check(_run(x, w, None), x, w, None)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [64, 257, 4103])
def test_sparse_rows_with_dense_windows(cols: int, dtype: torch.dtype, isa: str) -> None:
    """The pick path (batch 1, AVX-512, a pick index) on sparse rows: 64-column windows with 0 to 64 kept entries
    (one to four groups of 16), a last window of 1-63 columns, rows dense, empty and in between, tiles of four rows
    and the rows left after them."""
    rows = 40
    w = _weight(rows, cols, 0.97, dtype, seed=cols)
    g = torch.Generator().manual_seed(cols + 1)
    w[3] = torch.randn(cols, generator=g).to(dtype)  # a dense row: every window has 64 kept
    w[7, : cols // 2] = torch.randn(cols // 2, generator=g).to(dtype)  # 17-48 kept in some windows
    w[11, ::3] = 1.0
    assert (w != 0).float().mean() <= 0.15
    b = torch.randn(rows).to(dtype)
    for x in (torch.randn(1, cols).to(dtype), torch.randn(3, cols).to(dtype)[1:2]):
        _check(_run(x, w, b), x, w, b)
    _check(_run(x, w, None), x, w, None)


@needs_lib
def test_non_contiguous_inputs_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight(301, 77, 0.6, torch.float32, empty_rows=(3, 4, 300))
    b = torch.randn(301)
    x = torch.randn(77, 6).T  # rows of x 1 apart, entries 6 apart: copied to rows for the kernel
    strided = torch.randn(6, 200)[:, 10:87]  # rows 200 apart, entries adjacent: used as it is
    monkeypatch.setattr(_native, "PARALLEL_WORK", 0)  # split even a small product across the threads
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            _check(_run(x, w, b), x, w, b)
            _check(_run(strided, w, b), strided, w, b)
    finally:
        torch.set_num_threads(threads)


@needs_lib
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 150),
    zeros=st.floats(0.0, 1.0),
    batch=st.integers(0, 12),
    threads=st.integers(1, 4),
    bf16=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_sparsity_batch_and_threads(
    rows: int, cols: int, zeros: float, batch: int, threads: int, bf16: bool, bias: bool, seed: int
) -> None:
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = _weight(rows, cols, zeros, dtype, seed)
    b = torch.randn(rows).to(dtype) if bias else None
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    old, work = torch.get_num_threads(), _native.PARALLEL_WORK
    torch.set_num_threads(threads)
    _native.PARALLEL_WORK = 0
    try:
        _check(_run(x, w, b), x, w, b)
    finally:
        torch.set_num_threads(old)
        _native.PARALLEL_WORK = work


def test_the_torch_path_equals_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the library the op expands the weight and calls F.linear: the same results (up to summation order)."""
    w, b = _weight(33, 70, 0.7, torch.float32), torch.randn(33)
    layer = BitmaskLinear(w, b)
    x = torch.randn(4, 70)
    kernel = layer(x)
    monkeypatch.setattr(_native, "LIB", None)
    assert _native.bitmask_linear(x, layer.values, layer.mask, layer.row_offsets, b) is None
    torch.testing.assert_close(layer(x), kernel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, w, b))
    assert torch.equal(dense_of(layer.values, layer.mask, layer.row_offsets, 70), w)


@needs_lib
def test_what_the_kernel_does_not_take_goes_the_torch_way() -> None:
    """Other dtypes, shapes that disagree, unpadded values, tracers: None (the caller's torch path), never a crash."""
    w = _weight(9, 20, 0.5, torch.float32)
    values, mask, offsets = pack(w)
    x = torch.randn(3, 20)
    assert _native.bitmask_linear(x, values.double(), mask, offsets, None) is None  # float64 values
    assert _native.bitmask_linear(x[0], values, mask, offsets, None) is None  # a 1-D input
    assert _native.bitmask_linear(torch.randn(3, 25), values, mask, offsets, None) is None  # mask of another width
    assert _native.bitmask_linear(x, values[: -_native.BITMASK_PAD], mask, offsets, None) is None  # not padded
    assert _native.bitmask_linear(x, values, mask, offsets.int(), None) is None  # int32 offsets
    lying = offsets.clone()
    lying[3:] += 5  # offsets that disagree with the mask would make the kernel read past the values
    assert _native.bitmask_linear(x, values, mask, lying, None) is None
    assert _native.bitmask_linear(x, values, mask, offsets, None) is not None  # the same tensors, offsets right
    assert _native.bitmask_linear(x, values, mask, offsets, torch.randn(8)) is None  # a bias of another size
    assert _native.bitmask_linear(x.to("meta"), values, mask, offsets, None) is None  # no memory behind it
    layer = BitmaskLinear(w.double(), None)  # float64: the op's torch path
    torch.testing.assert_close(layer(x.double()), F.linear(x.double(), w.double()))
    with pytest.raises(ValueError, match="2-D floating-point weight"):
        pack(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="use one of"):
        _native.bitmask_isa("sse9")


def test_large_buffers_are_asked_for_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's values and mask from HUGE_PAGE_MIN_BYTES on: a fresh mapping of their own (memory reused from
    the allocator is already in small pages), madvise(MADV_HUGEPAGE) over all of it before anything is written;
    smaller buffers, or no madvise (not Linux): plain memory."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(_native, "_MADVISE", lambda start, length, advice: calls.append((start, length, advice)) or 0)
    monkeypatch.setattr(_native, "HUGE_PAGE_MIN_BYTES", 1 << 16)
    w = _weight(200, 300, 0.5, torch.float32)
    layer = BitmaskLinear(w, None)
    assert torch.equal(layer.weight, w)
    assert len(calls) == 1 and calls[0][2] == 14  # the values (~120 KB); the mask (7.6 KB) is too small
    start, length, _ = calls[0]
    p, n = layer.values.data_ptr(), layer.values.numel() * 4
    assert start == p and p % mmap.PAGESIZE == 0 and length == -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
    monkeypatch.setattr(_native, "_MADVISE", None)
    again = BitmaskLinear(w, None)
    assert torch.equal(again.values, layer.values) and torch.equal(again.mask, layer.mask)
    x = torch.randn(2, 300)
    torch.testing.assert_close(again(x), layer(x))


@pytest.mark.parametrize("rows,cols", [(8, 0), (0, 8), (0, 0)])
def test_layers_without_inputs_or_outputs_run_forward_and_backward(rows: int, cols: int) -> None:
    """A Linear(0, n) or Linear(n, 0) as F.linear computes it (reshape(-1, 0) failed: -1 is ambiguous)."""
    w = torch.randn(rows, cols)
    b = torch.randn(rows, requires_grad=True)
    layer = BitmaskLinear(w, b.detach())
    layer.bias.requires_grad_(True)
    layer.values.requires_grad_(True)
    x = torch.randn(2, 3, cols, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, b))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    assert layer.bias.grad is not None and torch.equal(layer.bias.grad, torch.full((rows,), 6.0))


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_infinite_input_times_kept_entries_is_inf_on_every_path(isa: str, dtype: torch.dtype) -> None:
    """x[c] = inf where column c is kept in every row: each output is +-inf, as F.linear gives. The pick path
    (sparse rows at batch 1) must leave out the unused lanes of a group of 16 kept entries: they pick x at other
    columns of the window and would multiply it by values of the next window (or zeros: NaN)."""
    w = _weight(6, 200, 0.97, dtype, seed=3)
    w[:, 64] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0]).to(dtype)  # the first column of the second window
    x = torch.randn(1, 200).to(dtype)
    x[0, 64] = float("inf")
    y = _run(x, w, None)
    assert torch.equal(y, F.linear(x.float(), w.float())), y


def _at_page_end(t: torch.Tensor, keep: list[object]) -> torch.Tensor:
    """A copy of the contiguous ``t`` whose last byte is the last one before a page that cannot be read (a read past
    it is a segmentation fault)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes, libc.mprotect.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    nbytes, page = t.numel() * t.element_size(), mmap.PAGESIZE
    pages = -(-nbytes // page) + 1
    area = mmap.mmap(-1, pages * page)
    keep.append(area)
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(area)) + (pages - 1) * page, page, 0) == 0
    flat = torch.frombuffer(area, dtype=torch.uint8)[(pages - 1) * page - nbytes : (pages - 1) * page]
    out = flat.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


@needs_lib
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through libc")
@pytest.mark.parametrize("cols", [1, 9, 63, 64, 65, 129, 4103])
def test_no_path_reads_past_x_the_mask_or_the_padded_values(isa: str, cols: int) -> None:
    """x, the mask and the values (with their BITMASK_PAD entries) each end where unreadable memory starts: every
    path, sparse rows (the pick path, its index at a page end too) and a dense last row (its last window full), batch
    1 and 3."""
    keep: list[object] = []
    for zeros in (0.98, 0.5):
        w = _weight(5, cols, zeros, torch.float32, seed=cols)
        w[-1] = torch.randn(cols)
        values, mask, offsets = pack(w)
        values = _at_page_end(values[: int(offsets[-1]) + _native.BITMASK_PAD], keep)
        mask = _at_page_end(mask, keep)
        pick = _native.pick_index(mask, cols)
        assert pick is not None
        pick = _at_page_end(pick, keep)
        for batch in (1, 3):
            x = _at_page_end(torch.randn(batch, cols), keep)
            for index in (None, pick):
                y = _native.bitmask_linear(x, values, mask, offsets, None, index)
                assert y is not None
                _check(y, x, w, None)


def _listed_pick_index(w: torch.Tensor) -> list[int]:
    """The pick index of ``w``, written out entry by entry: per tile of four rows and 64-column window, the tile's
    rows' kept entries in the window, then each row's kept columns there (mod 64); then BITMASK_PAD zeros."""
    keep = (w != 0).tolist()
    rows, cols = w.shape
    out: list[int] = []
    for r0 in range(0, rows, 4):
        tile = keep[r0 : r0 + 4]
        for c0 in range(0, cols, 64):
            kept = [[c - c0 for c in range(c0, min(c0 + 64, cols)) if row[c]] for row in tile]
            out += [len(k) for k in kept] + [c for k in kept for c in k]
    return out + [0] * _native.BITMASK_PAD


@needs_lib
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
@pytest.mark.parametrize("cols", [1, 8, 63, 64, 65, 200])
def test_the_pick_index_lists_each_windows_kept_entries_and_their_columns(rows: int, cols: int) -> None:
    """pick_index against the layout written out in Python; bits past ``cols`` in the last mask byte ignored."""
    w = _weight(rows, cols, 0.6, torch.float32, seed=cols)
    w[rows // 2] = 0
    w[-1] = 1.0
    values, mask, offsets = pack(w)
    if cols % 8:
        mask[:, -1] |= 0xFF << (cols % 8) & 0xFF  # stray bits past the row's end
    pick = _native.pick_index(mask, cols)
    assert pick is not None and pick.dtype == torch.uint8 and pick.tolist() == _listed_pick_index(w)


@needs_lib
def test_a_pick_index_that_disagrees_is_not_used() -> None:
    """A pick index of another size or dtype, or whose window counts do not add up to the rows' kept entries
    (the kernel would read past a row's values or the index), is left out: the other paths give the product."""
    w = _weight(9, 130, 0.9, torch.float32)
    values, mask, offsets = pack(w)
    x = torch.randn(1, 130)
    pick = _native.pick_index(mask, 130)
    assert pick is not None
    lying, swapped, overfull = pick.clone(), pick.clone(), pick.clone()
    lying[0] += 3  # the first row's first window claims three more kept entries
    swapped[0], swapped[1] = pick[1], pick[0]  # the counts add up per tile, not per row
    overfull[0] = 200  # more than a window holds
    for bad in (lying, swapped, overfull, pick[:-1], torch.cat([pick, pick[:1]]), pick.to(torch.int16), pick[:30]):
        y = _native.bitmask_linear(x, values, mask, offsets, None, bad)
        assert y is not None
        _check(y, x, w, None)


@needs_lib
def test_sparse_layers_hold_a_pick_index_and_dense_ones_do_not(isa: str) -> None:
    """A layer with at most PICK_KEPT of its entries kept holds the pick index where the path is AVX-512; it is
    rebuilt when a denser weight is loaded, travels with deepcopy and pickle, and stays out of the state dict."""
    sparse, dense = _weight(20, 300, 0.9, torch.float32), _weight(20, 300, 0.5, torch.float32)
    layer = BitmaskLinear(sparse, None)
    assert (layer.pick is not None) == isa.startswith("avx512")
    assert BitmaskLinear(dense, None).pick is None
    assert set(layer.state_dict()) == {"weight"}
    x = torch.randn(1, 300)
    for copy in (copy_module.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert (copy.pick is None) == (layer.pick is None)
        torch.testing.assert_close(copy(x), layer(x))
    _check(layer(x), x, sparse, None)
    layer.load_state_dict({"weight": dense})
    assert layer.pick is None
    _check(layer(x), x, dense, None)
