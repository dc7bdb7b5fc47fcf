"""The optional C kernels (``fx_sparsify/_kernels.c``): built where a compiler is, equal to the torch paths.

The decoder of compressed checkpoints is tested with the other decoders in ``test_io_compressed.py``;
here: the build, and the fused no-grad masked embedding bag against ``F.embedding_bag`` of the masked
table and against the torch path it replaces (the same tensors, ``_native.LIB`` set to None).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from fx_sparsify import _native, ops

needs_lib = pytest.mark.skipif(_native.LIB is None, reason="the C kernels are not built (no C compiler at install)")


def test_the_kernels_are_built_where_a_compiler_is() -> None:
    """pip builds ``_kernels.c`` as an optional extension: with a compiler on the machine it must be there."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the torch / numpy paths are used")
    assert _native.LIB is not None, "reinstall (pip install -e .) to build fx_sparsify/_kernels.c"


def _table(dtype: torch.dtype = torch.float32, rows: int = 50, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows * dim)
    weight = torch.randn(rows, dim, generator=g).to(dtype)
    weight[0, :4] = torch.tensor([float("inf"), float("nan"), -0.0, -float("inf")]).to(dtype)
    weight[1, :2] = torch.tensor([-1e-40, 3e38]).to(dtype)  # a subnormal (fp32), a sum that overflows
    mask = torch.rand(rows, dim, generator=g) > 0.4
    mask[0, :4] = torch.tensor([True, True, False, False])  # a pruned -0.0 and a pruned -inf (-> nan)
    return weight, mask


CASES = {
    "2d": dict(ids=[[0, 1, 2], [1, 0, 5], [7, 7, 7], [0, 3, 1], [1, 1, 1]]),
    "2d-bags-of-one": dict(ids=[[0], [1], [49], [3]]),
    "offsets": dict(ids=[0, 1, 2, 9, 9, 4, 1, 0, 33], offsets=[0, 2, 2, 7]),
    "offsets-last": dict(ids=[0, 1, 2, 9, 9, 4, 1, 0, 33], offsets=[0, 2, 2, 7, 9], include_last_offset=True),
}


def _call(case: dict, weight: torch.Tensor, mask: torch.Tensor, mode: str, index_dtype: torch.dtype) -> torch.Tensor:
    ids = torch.as_tensor(case["ids"]).to(index_dtype)
    offsets = torch.as_tensor(case["offsets"]).to(index_dtype) if "offsets" in case else None
    with torch.no_grad():
        return ops.embedding_bag_masked(
            ids, weight, mask, offsets, mode=mode, include_last_offset=case.get("include_last_offset", False)
        )


@needs_lib
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_bag_equals_the_torch_path_and_the_masked_table(
    case: dict, mode: str, dtype: torch.dtype, index_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight, mask = _table(dtype)
    ids = torch.as_tensor(case["ids"]).to(index_dtype)
    offsets = torch.as_tensor(case["offsets"]).to(index_dtype) if "offsets" in case else None
    last = case.get("include_last_offset", False)
    with torch.no_grad():
        assert _native.masked_bag(ids, weight, mask, offsets, last, mode == "mean") is not None  # the kernel ran
    fused = _call(case, weight, mask, mode, index_dtype)
    want = F.embedding_bag(ids, weight * mask.to(dtype), offsets, mode=mode, include_last_offset=last)
    monkeypatch.setattr(_native, "LIB", None)
    torch_path = _call(case, weight, mask, mode, index_dtype)
    assert fused.dtype == dtype and fused.shape == want.shape
    torch.testing.assert_close(fused, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused, torch_path, rtol=0, atol=0, equal_nan=True)


@needs_lib
def test_a_large_random_bag_equals_the_masked_table() -> None:
    """Many rows, long bags (the prefetch runs ahead of the bag), a 64-wide table."""
    g = torch.Generator().manual_seed(1)
    weight, mask = torch.randn(5000, 64, generator=g), torch.rand(5000, 64, generator=g) > 0.5
    ids = torch.randint(0, 5000, (300, 20), generator=g)
    with torch.no_grad():
        got = ops.embedding_bag_masked(ids, weight, mask, mode="sum")
    assert torch.equal(got, F.embedding_bag(ids, weight * mask, mode="sum"))


@pytest.mark.parametrize("bad", [[[0, 50]], [[0, -1]]], ids=["past-the-table", "negative"])
@needs_lib
def test_an_id_outside_the_table_is_an_error_naming_it(bad: list) -> None:
    """A RuntimeError like torch's (``F.embedding_bag`` raises one), naming the id, its position and the range."""
    weight, mask = _table()
    ids = torch.tensor(bad)
    with pytest.raises(RuntimeError), torch.no_grad():
        F.embedding_bag(ids, weight * mask, mode="sum")
    with pytest.raises(RuntimeError, match=rf"id {bad[0][1]} at position 1 .* must be in \[0, 50\)"), torch.no_grad():
        ops.embedding_bag_masked(ids, weight, mask, mode="sum")


def test_bags_of_no_ids_in_a_2d_input_get_torchs_error() -> None:
    """``F.embedding_bag`` refuses a ``[bags, 0]`` input; the kernel declines it rather than return zeros."""
    weight, mask = _table()
    ids = torch.zeros(3, 0, dtype=torch.int64)
    assert _native.masked_bag(ids, weight, mask, None, False, False) is None
    with pytest.raises(RuntimeError) as want, torch.no_grad():
        F.embedding_bag(ids, weight * mask, mode="sum")
    with pytest.raises(RuntimeError) as got, torch.no_grad():
        ops.embedding_bag_masked(ids, weight, mask, mode="sum")
    assert str(got.value) == str(want.value)


def test_decreasing_offsets_are_a_value_error() -> None:
    """torch pools a bag with a negative length from memory it never wrote (NaN that varies between calls)."""
    weight, mask = _table()
    ids, off = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 4, 2])
    assert _native.masked_bag(ids, weight, mask, off, False, False) is None
    with pytest.raises(ValueError, match="must not decrease"), torch.no_grad():
        ops.embedding_bag_masked(ids, weight, mask, off, mode="sum")


@pytest.mark.parametrize("offsets", [[1, 3]], ids=["not-from-zero"])
def test_offsets_torch_would_refuse_get_torchs_answer(offsets: list) -> None:
    weight, mask = _table()
    ids, off = torch.tensor([0, 1, 2, 3, 4]), torch.tensor(offsets)
    assert _native.masked_bag(ids, weight, mask, off, False, False) is None
    try:
        with torch.no_grad():
            want = F.embedding_bag(ids, weight * mask, off, mode="sum")
    except (RuntimeError, IndexError, ValueError) as err:
        with pytest.raises(type(err)), torch.no_grad():
            ops.embedding_bag_masked(ids, weight, mask, off, mode="sum")
    else:
        with torch.no_grad():
            torch.testing.assert_close(ops.embedding_bag_masked(ids, weight, mask, off, mode="sum"), want)


def test_what_the_kernel_does_not_take_goes_the_torch_way() -> None:
    """bf16, a transposed (non-contiguous) table (no table-sized copy is made for the kernel), a float mask."""
    weight, mask = _table()
    ids = torch.tensor([[0, 1], [4, 5]])
    cases = [(weight.bfloat16(), mask), (weight.t().contiguous().t(), mask), (weight, mask.float())]
    for w, m in cases:
        assert _native.masked_bag(ids, w, m, None, False, False) is None
        with torch.no_grad():
            got = ops.embedding_bag_masked(ids, w, m, mode="sum")
        torch.testing.assert_close(got, F.embedding_bag(ids, w * m.to(w.dtype), mode="sum"), equal_nan=True)


@needs_lib
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bags_split_across_threads_equal_one_pass(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large lookups run as contiguous bag ranges on torch.get_num_threads() threads: the same result."""
    weight, mask = _table()
    one = _call(case, weight, mask, "mean", torch.int64)
    monkeypatch.setattr(_native, "PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(_native._split(4, 1)) == 3
        split = _call(case, weight, mask, "mean", torch.int64)
        with pytest.raises(RuntimeError, match="id 50 at position 4"), torch.no_grad():
            ops.embedding_bag_masked(torch.tensor([[0, 1], [2, 3], [50, 1]]), weight, mask, mode="sum")
        ids, off = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 3, 1])  # decreasing: torch's answer
        assert _native.masked_bag(ids, weight, mask, off, False, False) is None
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(split, one, rtol=0, atol=0, equal_nan=True)


@needs_lib
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "ids", [[0, 1, 2, 49, 0], [[0, 1], [1, 0], [7, 7]], [[[3]], [[0]]], []], ids=["1d", "2d", "3d", "empty"]
)
def test_fused_rows_equal_the_torch_path_and_the_masked_table(
    ids: list, dtype: torch.dtype, index_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight, mask = _table(dtype)
    index = torch.tensor(ids, dtype=index_dtype)
    with torch.no_grad():
        assert _native.masked_rows(index, weight, mask) is not None  # the kernel ran
        fused = ops.embedding_masked(index, weight, mask, padding_idx=1)  # padding_idx: only the gradient
    want = F.embedding(index, weight * mask.to(dtype), padding_idx=1)
    monkeypatch.setattr(_native, "LIB", None)
    with torch.no_grad():
        torch_path = ops.embedding_masked(index, weight, mask, padding_idx=1)
    assert fused.dtype == dtype and fused.shape == want.shape == (*index.shape, weight.shape[1])
    torch.testing.assert_close(fused, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused, torch_path, rtol=0, atol=0, equal_nan=True)


@needs_lib
def test_fused_rows_split_across_threads_and_bad_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, mask = _table()
    ids = torch.randint(0, 50, (7, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = ops.embedding_masked(ids, weight, mask)
    monkeypatch.setattr(_native, "PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad():
            split = ops.embedding_masked(ids, weight, mask)
            with pytest.raises(RuntimeError, match=r"id -3 at position 2 .* must be in \[0, 50\)"):
                ops.embedding_masked(torch.tensor([0, 4, -3, 9]), weight, mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(split, one, rtol=0, atol=0, equal_nan=True)
    weight_t = weight.t().contiguous().t()  # not one block: the torch path, no copy of the table
    assert _native.masked_rows(ids, weight_t, mask) is None and _native.masked_rows(ids, weight.half(), mask) is None


@needs_lib
def test_random_tables_bags_and_dims_match_torch() -> None:
    """A property check over odd widths (the vector loops' tails), random bag lengths (empty ones too),
    both modes, rows and bags."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(
        rows=st.integers(1, 40),
        dim=st.integers(1, 37),
        lengths=st.lists(st.integers(0, 6), min_size=1, max_size=9),
        seed=st.integers(0, 2**16),
        mean=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def check(rows: int, dim: int, lengths: list[int], seed: int, mean: bool, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(rows, dim, generator=g, dtype=dtype)
        mask = torch.rand(rows, dim, generator=g) > 0.5
        ids = torch.randint(0, rows, (sum(lengths),), generator=g)
        offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        masked = weight * mask.to(dtype)
        mode = "mean" if mean else "sum"
        with torch.no_grad():
            bag = _native.masked_bag(ids, weight, mask, offsets, False, mean)
            got_rows = _native.masked_rows(ids, weight, mask)
        assert bag is not None and got_rows is not None
        torch.testing.assert_close(bag, F.embedding_bag(ids, masked, offsets, mode=mode), rtol=0, atol=0)
        assert torch.equal(got_rows, F.embedding(ids, masked))

    check()


@needs_lib
@pytest.mark.parametrize("kind", ["bag", "rows"])
def test_lookups_allocate_only_their_output(kind: str) -> None:
    """The invariant behind the speed (issue 14): no gathered rows, no cast mask, nothing table-sized;
    the output is the only allocation (the torch path allocates ids x dim floats several times)."""
    weight, mask = torch.randn(20000, 64), torch.rand(20000, 64) > 0.5
    ids = torch.randint(0, 20000, (64, 20))
    call = (
        (lambda: ops.embedding_bag_masked(ids, weight, mask, mode="sum"))
        if kind == "bag"
        else (lambda: ops.embedding_masked(ids, weight, mask))
    )
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        out = call()
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocated == [out.nbytes]


# --- what must never reach the kernels (review findings) ----------------------------------------------------
@needs_lib
def test_offsets_past_the_input_or_decreasing_get_torchs_error_never_a_read_past_the_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ids are a view of a longer buffer: offsets past the input (include_last_offset) or decreasing
    (split across threads: a piece cannot see the others' offsets) must not make the kernel read on."""
    weight, mask = _table()
    ids = torch.tensor([1, 2, 3, 4, 5])[:3]
    last = torch.tensor([0, 5])
    assert _native.masked_bag(ids, weight, mask, last, True, False) is None
    with pytest.raises(RuntimeError) as want, torch.no_grad():
        F.embedding_bag(ids, weight * mask, last, mode="sum", include_last_offset=True)
    with pytest.raises(RuntimeError) as got, torch.no_grad():
        ops.embedding_bag_masked(ids, weight, mask, last, mode="sum", include_last_offset=True)
    assert str(got.value) == str(want.value)
    monkeypatch.setattr(_native, "PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = torch.arange(10)[:4]
        assert _native.masked_bag(ids, weight, mask, torch.tensor([0, 3, 1]), False, False) is None
        assert _native.masked_bag(ids, weight, mask, torch.tensor([0.0, 2.0]), False, False) is None  # float offsets
    finally:
        torch.set_num_threads(threads)


@needs_lib
def test_an_id_outside_the_table_is_both_torchs_error_types() -> None:
    weight, mask = _table()
    with pytest.raises(IndexError), torch.no_grad():  # as F.embedding's
        ops.embedding_masked(torch.tensor([3, 50]), weight, mask)
    with pytest.raises(RuntimeError), torch.no_grad():  # as F.embedding_bag's
        ops.embedding_bag_masked(torch.tensor([[3, 50]]), weight, mask, mode="sum")
    with pytest.raises(AssertionError) as want:
        F.embedding(torch.tensor([1]), weight, padding_idx=60)
    with pytest.raises(AssertionError) as got, torch.no_grad():  # an out-of-range padding_idx: torch's check
        ops.embedding_masked(torch.tensor([1]), weight, mask, padding_idx=60)
    assert str(got.value) == str(want.value)


@needs_lib
def test_tensors_without_real_cpu_memory_and_transforms_take_the_torch_path() -> None:
    """meta / fake tensors, a default device, forward AD and vmap: no data_ptr() of them is ever read."""
    import torch.autograd.forward_ad as fwad
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, mask = _table()
    ids = torch.tensor([[0, 3], [4, 1]])
    want = F.embedding(ids, weight * mask)
    with torch.no_grad():
        assert _native.masked_rows(ids.to("meta"), weight, mask) is None
        assert _native.masked_rows(ids, weight, mask.to("meta")) is None
        meta = ops.embedding_masked(ids.to("meta"), weight.to("meta"), mask.to("meta"))
        assert meta.device.type == "meta" and meta.shape == want.shape
        with torch.device("meta"):  # the default device: the output is still a CPU tensor
            torch.testing.assert_close(ops.embedding_masked(ids, weight, mask), want, rtol=0, atol=0, equal_nan=True)
        with FakeTensorMode() as mode:
            fake = ops.embedding_masked(mode.from_tensor(ids), mode.from_tensor(weight), mode.from_tensor(mask))
        assert fake.shape == want.shape
        with fwad.dual_level():
            dual = fwad.make_dual(weight, torch.ones_like(weight))
            assert _native.masked_rows(ids, dual, mask) is None
        rows = torch.func.vmap(lambda i: ops.embedding_masked(i, weight, mask))(ids)
    torch.testing.assert_close(rows, want, rtol=0, atol=0, equal_nan=True)


def test_a_stale_build_warns_and_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install not rebuilt after a pull lacks a kernel this code calls: import must still work."""
    if _native.LIB is None:
        pytest.skip("no library to load")

    class Old:  # a library without the newer symbols
        def __getattr__(self, name: str) -> None:
            raise AttributeError(f"undefined symbol: {name}")

    monkeypatch.setattr(_native.ctypes, "CDLL", lambda path: Old())
    with pytest.warns(RuntimeWarning, match=r"not using the C kernels .* reinstall \(pip install -e \.\)"):
        assert _native._load() is None
