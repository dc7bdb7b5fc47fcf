"""Compressed checkpoints (SPEC §11): bit-exact round trips, size bounds, strict loads, damaged files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _compressed, _native

from models import MLP


def _bits(t: torch.Tensor) -> torch.Tensor:
    return _compressed._as_bits(t) if t.is_floating_point() else t


def _assert_bit_exact(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert (v.dtype, v.shape) == (b[k].dtype, b[k].shape), k
            assert torch.equal(_bits(v), _bits(b[k])), k
        else:
            assert v == b[k], k


def _sparse(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with exactly round(sparsity * numel) zeros, half of the pruned entries negative (-0.0 after a mul)."""
    w = torch.randn(shape)
    k = round(sparsity * w.numel())
    idx = torch.randperm(w.numel())[:k]
    w.view(-1)[idx] = 0.0
    return w.to(dtype)


@pytest.fixture(params=["native", "numpy", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Decode with the C decoder, with numpy and with the pure-torch fallback (same files, same tensors)."""
    if request.param == "native" and _native.LIB is None:
        pytest.skip("the C decoder is not built (no C compiler at install)")
    if request.param != "native":
        monkeypatch.setattr(_native, "LIB", None)
    if request.param == "torch":
        monkeypatch.setattr(_compressed, "_np", None)
    elif _compressed._np is None:
        pytest.skip("numpy is not installed")
    return str(request.param)


def test_round_trip_is_bit_exact_for_every_kind_of_entry(tmp_path: Path, backend: str) -> None:
    state: dict[str, Any] = {
        "fc.weight": _sparse((64, 96), 0.7),
        "fc.bias": torch.randn(64),
        "half.weight": _sparse((32, 40), 0.9, torch.float16),
        "bf.weight": _sparse((32, 41), 0.5, torch.bfloat16),  # a row length that is not a multiple of 8
        "f64": _sparse((300,), 0.8, torch.float64),
        "conv.weight": _sparse((8, 4, 3, 3), 0.75),
        "odd": torch.tensor([-0.0, 0.0, float("nan"), float("-inf"), 1.0, 0.0, 0.0, 0.0] * 8),
        "count": torch.tensor(7),
        "ints": torch.arange(12).view(3, 4),
        "flags": torch.rand(5, 5) > 0.5,
        "empty": torch.zeros(0, 4),
        "_extra_state": {"steps": 3},
    }
    path = tmp_path / "c.safetensors"
    fxs.save_compressed(state, path)
    back = fxs.load_compressed(path)
    _assert_bit_exact(state, back)
    stored = load_file(str(path)).keys()
    for name in ("fc", "half", "bf", "f64", "conv", "odd"):
        assert {f"{name}.{p}" for p in _compressed.PARTS} <= stored, name  # stored sparse
    assert {"fc.bias", "count", "ints", "flags", "empty"} <= stored  # stored as they are


def test_numpy_and_torch_backends_write_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    state = {"a.weight": _sparse((33, 70), 0.6), "b": _sparse((5, 3, 9), 0.8, torch.bfloat16)}
    fxs.save_compressed(state, tmp_path / "np.safetensors")
    monkeypatch.setattr(_compressed, "_np", None)
    fxs.save_compressed(state, tmp_path / "torch.safetensors")
    a, b = load_file(str(tmp_path / "np.safetensors")), load_file(str(tmp_path / "torch.safetensors"))
    _assert_bit_exact(a, b)


@pytest.mark.parametrize(("sparsity", "bound"), [(0.5, 0.535), (0.9, 0.135)])
def test_size_bounds(tmp_path: Path, sparsity: float, bound: float) -> None:
    w = _sparse((1024, 1024), sparsity)
    fxs.save_compressed({"fc.weight": w}, tmp_path / "c.safetensors")
    stored = load_file(str(tmp_path / "c.safetensors"))
    sparse_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert sparse_bytes <= bound * w.numel() * 4
    # the whole file, header included, against a dense safetensors file of the same tensor
    save_file({"fc.weight": w}, str(tmp_path / "dense.safetensors"))
    ratio = (tmp_path / "c.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= bound


def test_dense_tensors_stay_dense() -> None:
    assert _compressed._compress(torch.randn(64, 64)) is None  # no zeros: values + bits would be larger
    assert _compressed._compress(_sparse((64, 64), 0.02)) is None  # 2 % zeros do not pay for the bitmask
    assert _compressed._compress(_sparse((64, 64), 0.1)) is not None


def _squashed_mlp() -> tuple[MLP, torch.fx.GraphModule]:
    model = MLP()
    sgm = fxs.sparsify_graph(
        model, {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.8}]}
    )
    sgm.step()
    return model, sgm.squash()


def test_squashed_model_saves_small_and_loads_into_the_eager_model(tmp_path: Path) -> None:
    model, squashed = _squashed_mlp()
    path = tmp_path / "model.safetensors"
    fxs.save_compressed(squashed, path)
    save_file(squashed.state_dict(), str(tmp_path / "dense.safetensors"))
    assert path.stat().st_size < 0.5 * (tmp_path / "dense.safetensors").stat().st_size
    fresh = MLP()
    assert fxs.load_compressed(path, fresh) is fresh
    _assert_bit_exact(squashed.state_dict(), fresh.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), squashed(x))


def test_squash_writes_positive_zeros_so_pruned_negatives_round_trip(tmp_path: Path) -> None:
    _, squashed = _squashed_mlp()
    for name, w in squashed.state_dict().items():
        if name.endswith("weight"):
            assert not bool(torch.signbit(w[w == 0]).any()), name  # +0.0, never -0.0
    fxs.save_compressed(squashed, tmp_path / "m.safetensors")
    stored = load_file(str(tmp_path / "m.safetensors"))
    for prefix in ("fc1", "fc2"):
        keep = _compressed._unpack(stored[f"{prefix}.bitmask"], squashed.get_parameter(f"{prefix}.weight").shape[1])
        assert float(keep.float().mean()) == pytest.approx(0.2, abs=0.01)  # only the kept entries are stored


def test_a_sparse_graph_module_with_extra_state_round_trips(tmp_path: Path) -> None:
    model = MLP()
    spec = {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    fxs.save_compressed(sgm.state_dict(), tmp_path / "sgm.safetensors")  # the resumable form (sgm itself is refused)
    other = fxs.sparsify_graph(MLP(), spec)
    fxs.load_compressed(tmp_path / "sgm.safetensors", other)
    assert other._fxs.steps == 1
    _assert_bit_exact(sgm.state_dict(), other.state_dict())


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    w = _sparse((16, 16), 0.01)  # stored dense (too few zeros), twice under two names
    fxs.save_compressed({"a.weight": w, "b.weight": w}, tmp_path / "t.safetensors")
    back = fxs.load_compressed(tmp_path / "t.safetensors")
    assert torch.equal(back["a.weight"], w) and torch.equal(back["b.weight"], w)


def test_strict_load_names_missing_unexpected_and_mismatched_keys(tmp_path: Path) -> None:
    _, squashed = _squashed_mlp()
    state = dict(squashed.state_dict())
    state["extra.weight"] = state.pop("fc2.weight")
    fxs.save_compressed(state, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"missing from the file: 'fc2.weight'.*not in the model: 'extra.weight'"):
        fxs.load_compressed(tmp_path / "m.safetensors", MLP())
    state = dict(squashed.state_dict())
    state["fc2.weight"] = torch.zeros(3, 3)
    fxs.save_compressed(state, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"'fc2.weight' has shape \(3, 3\) in the file"):
        fxs.load_compressed(tmp_path / "shape.safetensors", MLP())
    del state["fc2.weight"]
    fxs.save_compressed(state, tmp_path / "partial.safetensors")
    fxs.load_compressed(tmp_path / "partial.safetensors", MLP(), strict=False)


def test_bad_input_to_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        fxs.save_compressed([torch.zeros(2)], tmp_path / "x.safetensors")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'opt' is a object"):
        fxs.save_compressed({"w": torch.zeros(2), "opt": object()}, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fxs.load_compressed(tmp_path / "nope.safetensors")


# --- damaged and foreign files ---------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "c.safetensors"
    fxs.save_compressed({"a.weight": _sparse((32, 64), 0.5), "b.weight": _sparse((32, 64), 0.9)}, path)
    return path


def _rewrite(path: Path, edit: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write the stored tensors of ``path`` again after ``edit(tensors, header)``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[_compressed.HEADER_KEY])
    edit(tensors, header)
    meta[_compressed.HEADER_KEY] = json.dumps(header)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata=metadata if metadata is not None else meta)
    return out


def test_truncated_file_names_the_tensor(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated: tensor '[ab]\.\w+' ends at byte"):
        fxs.load_compressed(saved)
    saved.write_bytes(data[:20])
    with pytest.raises(ValueError, match="not a safetensors file or truncated"):
        fxs.load_compressed(saved)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a safetensors file"):
        fxs.load_compressed(tmp_path / "x")
    (tmp_path / "y").write_bytes((8).to_bytes(8, "little") + b"notjson!" + b"\0" * 8)
    with pytest.raises(ValueError, match="header is not JSON"):
        fxs.load_compressed(tmp_path / "y")


def test_foreign_format_or_newer_version_is_refused(saved: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint format 'other'"):
        fxs.load_compressed(_rewrite(saved, lambda t, h: h.update(format="other")))
    with pytest.raises(ValueError, match="version 2; this fx_sparsify reads version 1"):
        fxs.load_compressed(_rewrite(saved, lambda t, h: h.update(version=2)))


def test_mask_and_value_counts_that_disagree_name_the_tensor(saved: Path) -> None:
    def drop_value(t: dict[str, torch.Tensor], h: dict[str, Any]) -> None:
        t["b.compressed"] = t["b.compressed"][:-1].clone()

    with pytest.raises(ValueError, match=r"tensor 'b.weight': the bitmask marks \d+ entries but \d+ values"):
        fxs.load_compressed(_rewrite(saved, drop_value))

    def flip_bit(t: dict[str, torch.Tensor], h: dict[str, Any]) -> None:
        t["a.bitmask"] = t["a.bitmask"].clone()
        t["a.bitmask"][0, 0] ^= 1

    with pytest.raises(ValueError, match="tensor 'a.weight': the bitmask marks"):
        fxs.load_compressed(_rewrite(saved, flip_bit))

    def wrong_shape(t: dict[str, torch.Tensor], h: dict[str, Any]) -> None:
        t["a.shape"] = torch.tensor([32, 128])

    with pytest.raises(ValueError, match=r"tensor 'a.weight': its bitmask must be uint8 of shape \(32, 16\)"):
        fxs.load_compressed(_rewrite(saved, wrong_shape))

    with pytest.raises(ValueError, match=r"tensor 'a.weight': compressed parts \['bitmask'\] are missing"):
        fxs.load_compressed(_rewrite(saved, lambda t, h: t.pop("a.bitmask")))


def test_a_file_without_our_header_is_read_as_compressed_tensors_layout(saved: Path) -> None:
    original = fxs.load_compressed(saved)
    plain = _rewrite(saved, lambda t, h: None, metadata={"format": "pt"})
    _assert_bit_exact(original, fxs.load_compressed(plain))


def test_compressed_tensors_reads_our_files_and_we_read_theirs(tmp_path: Path) -> None:
    ct = pytest.importorskip("compressed_tensors")
    state = {"a.weight": _sparse((32, 64), 0.5), "b.weight": _sparse((16, 24), 0.9), "a.bias": torch.randn(32)}
    ours = tmp_path / "ours.safetensors"
    fxs.save_compressed(state, ours)
    read = dict(ct.load_compressed(ours, ct.BitmaskConfig()))
    for name in ("a.weight", "b.weight"):
        assert torch.equal(read[name], state[name]), name
    theirs = tmp_path / "theirs.safetensors"
    ct.save_compressed(state, theirs, compression_format="sparse-bitmask")
    _assert_bit_exact(state, fxs.load_compressed(theirs))


def test_zstd_wraps_the_file(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    state = {"fc.weight": _sparse((256, 256), 0.7), "fc.bias": torch.zeros(256)}
    fxs.save_compressed(state, tmp_path / "plain.safetensors")
    fxs.save_compressed(state, tmp_path / "z.safetensors", zstd=3)
    assert (tmp_path / "z.safetensors").read_bytes()[:4] == _compressed.ZSTD_MAGIC
    assert (tmp_path / "z.safetensors").stat().st_size < (tmp_path / "plain.safetensors").stat().st_size
    _assert_bit_exact(state, fxs.load_compressed(tmp_path / "z.safetensors"))


def test_zstd_without_the_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_zstd(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "zstandard":
            raise ModuleNotFoundError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    with pytest.raises(ImportError, match=r"pip install fx-sparsify\[zstd\]"):
        fxs.save_compressed({"w": torch.zeros(4)}, tmp_path / "z.safetensors", zstd=3)


def test_bytes_per_entry_formula() -> None:
    # values + one bit per entry + a 4-byte row offset: no 64-bit indices
    t = _sparse((128, 256), 0.75)
    parts = _compressed._compress(t)
    assert parts is not None
    assert sum(p.numel() * p.element_size() for p in parts.values()) == (
        int((t != 0).sum()) * 4 + 128 * math.ceil(256 / 8) + 128 * 4 + 2 * 8
    )
    assert parts["row_offsets"].dtype == torch.int32 and parts["shape"].dtype == torch.int64


def test_model_in_a_module_is_accepted(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fxs.save_compressed(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fxs.load_compressed(tmp_path / "m.safetensors", fresh)
    _assert_bit_exact(model.state_dict(), fresh.state_dict())


def test_a_damaged_file_leaves_the_model_unchanged(tmp_path: Path) -> None:
    _, squashed = _squashed_mlp()
    path = tmp_path / "m.safetensors"
    fxs.save_compressed(squashed, path)

    def damage_last(t: dict[str, torch.Tensor], h: dict[str, Any]) -> None:
        t["head.compressed"] = t["head.compressed"][:-1].clone()

    bad = _rewrite(path, damage_last)
    fresh = MLP()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="tensor 'head.weight'"):
        fxs.load_compressed(bad, fresh)
    _assert_bit_exact(before, fresh.state_dict())
    ptr = fresh.fc1.weight.data_ptr()
    fxs.load_compressed(path, fresh)  # expanded straight into the model's own tensors
    assert fresh.fc1.weight.data_ptr() == ptr
    _assert_bit_exact(squashed.state_dict(), fresh.state_dict())


def test_activation_masks_folded_into_columns_write_positive_zeros() -> None:
    spec = {
        "activations": [
            {"target": "fc2", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.5}
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    for _ in range(3):
        sgm(torch.randn(8, 16))
    sgm.step()
    w = sgm.squash().fc2.weight
    assert int((w == 0).sum()) >= w.shape[0] * 16  # half of the input columns pruned
    assert not bool(torch.signbit(w[w == 0]).any())


@pytest.mark.parametrize("chunk", [5, 8, 24, 64])
def test_chunked_decode_matches_whole_tensor_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Pieces of whole rows, and pieces of one long row (a row longer than a chunk), decode bit-exact."""
    pytest.importorskip("numpy")
    monkeypatch.setattr(_native, "LIB", None)  # the numpy decoder works in chunks; the C one in one pass
    state = {
        "w.weight": _sparse((37, 21), 0.6),
        "long": _sparse((3, 203), 0.5),
        "vec": _sparse((517,), 0.7),
        "neg.weight": -torch.rand(9, 16) * (torch.rand(9, 16) > 0.5) + 0.0,
        "h.weight": _sparse((11, 13), 0.8, torch.float16),
    }
    fxs.save_compressed(state, tmp_path / "c.safetensors")
    monkeypatch.setattr(_compressed, "CHUNK", chunk)
    back = fxs.load_compressed(tmp_path / "c.safetensors")
    _assert_bit_exact(state, back)
    pieces = _compressed._blocks(37, 21)
    assert all(r1 - r0 == max(1, chunk // 21) or r1 == 37 for r0, r1, _, _ in pieces)
    assert all(c0 % 8 == 0 for _, _, c0, _ in _compressed._blocks(3, 203))
    # into preallocated (uninitialised) tensors: every entry is written
    for name, t in state.items():
        parts = _compressed._compress(t)
        assert parts is not None, name
        out = torch.full_like(t, float("nan"))
        _compressed._expand(parts, tuple(t.shape), out=out)
        assert torch.equal(_bits(out), _bits(t)), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 13), (40, 67), (2, 1000), (257,)])
def test_c_and_numpy_decoders_agree_bit_for_bit(
    dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every width, row lengths on and off a byte, all-kept / all-pruned rows, the checked tail of the C loop."""
    if _native.LIB is None or _compressed._np is None:
        pytest.skip("needs the C decoder and numpy")
    g = torch.Generator().manual_seed(sum(shape))
    width = _compressed._BITS[dtype.itemsize]  # any bit pattern of the width: NaNs, infs, -0.0, subnormals
    bits = torch.randint(
        -(2 ** (8 * dtype.itemsize - 1)), 2 ** (8 * dtype.itemsize - 1) - 1, shape, generator=g, dtype=torch.int64
    ).to(width)
    bits *= (torch.rand(shape, generator=g) > 0.5).to(width)
    if len(shape) == 2 and shape[0] > 2:
        bits[0] |= 1  # a row of only kept entries
        bits[1] = 0  # a row of only pruned ones
    t = bits.view(dtype)
    grid = bits.reshape(_compressed._grid(shape))
    parts = {"bitmask": _compressed._pack(grid != 0), "compressed": grid[grid != 0].view(dtype)}
    native = _compressed._expand(parts, shape, out=torch.full_like(t, 7))
    monkeypatch.setattr(_native, "LIB", None)
    numpy = _compressed._expand(parts, shape, out=torch.full_like(t, 7))
    assert torch.equal(_bits(native), _bits(numpy))
    assert torch.equal(_bits(native), bits)


def test_c_decoder_never_reads_past_the_values() -> None:
    """A mask that marks more entries than there are values: -1, and no value past the end is read."""
    if _native.LIB is None:
        pytest.skip("the C decoder is not built")
    packed = torch.full((4, 2), 0xFF, dtype=torch.uint8)  # 4 rows of 16 kept entries
    values = torch.arange(40, dtype=torch.int32)  # 64 marked, 40 stored
    out = torch.zeros(4, 16, dtype=torch.int32)
    used = _native.LIB.fxs_expand32(packed.data_ptr(), 4, 16, values.data_ptr(), 40, out.data_ptr())
    assert used == -1
    assert torch.equal(out.view(-1)[:40], values)
    with pytest.raises(ValueError, match="marks more entries"):
        _compressed._scatter_native(packed, values, torch.zeros(4, 16, dtype=torch.int32))


def test_a_shape_no_tensor_can_have_is_a_clear_error(saved: Path) -> None:
    def huge(t: dict[str, torch.Tensor], h: dict[str, Any]) -> None:
        t["a.shape"] = torch.tensor([2**31, 2**31, 4], dtype=torch.int64)

    with pytest.raises(ValueError, match=r"tensor 'a.weight': its shape part .* more than any tensor can"):
        fxs.load_compressed(_rewrite(saved, huge))


def test_loading_into_a_model_bumps_the_version_counters(tmp_path: Path) -> None:
    """The tensors are written through their memory: the version moves as with copy_, so a pending
    backward that saved the old weight fails loudly and the eval cache of weight * mask is recomputed."""
    model = MLP()
    path = tmp_path / "c.safetensors"
    fxs.save_compressed(
        {k: _sparse(tuple(v.shape), 0.5) if k.endswith("weight") else v for k, v in model.state_dict().items()}, path
    )
    x = torch.randn(2, 16, requires_grad=True)
    loss = model(x).square().sum()  # saves fc weights for backward
    before = {k: p._version for k, p in model.named_parameters()}
    fxs.load_compressed(path, model)
    assert all(p._version > before[k] for k, p in model.named_parameters() if k.endswith("weight"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_values_off_their_alignment_decode_the_same() -> None:
    """safetensors may hand back a tensor that starts off its element alignment (a crafted file)."""
    t = _sparse((8, 24), 0.5, torch.float64)
    parts = _compressed._compress(t)
    raw = torch.zeros(parts["compressed"].numel() * 8 + 2, dtype=torch.uint8)
    raw[2:].copy_(parts["compressed"].view(torch.uint8))
    shifted = torch.frombuffer(raw.numpy().data, dtype=torch.float64, offset=2, count=parts["compressed"].numel())
    assert shifted.data_ptr() % 8 == 2
    back = _compressed._expand({**parts, "compressed": shifted}, tuple(t.shape))
    assert torch.equal(_bits(back), _bits(t))


def test_zstd_frames_without_a_content_size_load_and_no_temporary_file_stays(tmp_path: Path) -> None:
    """The zstd file is compressed as a stream from a temporary safetensors file (never one bytes object in
    memory); a frame written by another streaming tool (no content size in its header) loads too."""
    zstandard = pytest.importorskip("zstandard")
    state = {"fc.weight": _sparse((64, 64), 0.7)}
    fxs.save_compressed(state, tmp_path / "plain.safetensors")
    fxs.save_compressed(state, tmp_path / "z.safetensors", zstd=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors", "z.safetensors"]
    streamed = tmp_path / "streamed.safetensors"
    with (tmp_path / "plain.safetensors").open("rb") as src, streamed.open("wb") as dst:
        zstandard.ZstdCompressor(level=1, write_checksum=True).copy_stream(src, dst)  # no size in the header
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(streamed.read_bytes())
    _assert_bit_exact(state, fxs.load_compressed(streamed))
    _assert_bit_exact(state, fxs.load_compressed(tmp_path / "z.safetensors"))
    with pytest.raises(OSError):
        fxs.save_compressed(state, tmp_path / "missing" / "z.safetensors", zstd=3)
    assert not list((tmp_path).glob(".*uncompressed"))


def test_a_zstd_file_is_decompressed_to_disk_and_a_damaged_frame_is_a_clear_error(tmp_path: Path) -> None:
    """Loading streams the frame into a temporary file beside it and maps that (never the whole file in
    memory); the temporary file is gone afterwards, also when the frame is damaged."""
    pytest.importorskip("zstandard")
    state = {"fc.weight": _sparse((64, 64), 0.7), "fc.bias": torch.randn(64)}
    path = tmp_path / "z.safetensors"
    fxs.save_compressed(state, path, zstd=3)
    _assert_bit_exact(state, fxs.load_compressed(path))
    model = nn.Module()
    model.fc = nn.Linear(64, 64)
    fxs.load_compressed(path, model)
    assert torch.equal(model.fc.weight.detach(), state["fc.weight"])
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte: without the frame's checksum this decoded to a wrong tensor
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"damaged.safetensors: a damaged zstd frame \(.*checksum"):
        fxs.load_compressed(damaged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.safetensors", "z.safetensors"]
