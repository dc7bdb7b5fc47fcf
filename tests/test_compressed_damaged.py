"""Damaged and hostile compressed checkpoints: every one a ValueError naming the file (and the tensor or field),
never a hang, a bare TypeError / AssertionError, a wrong tensor or a half-written model; saves that fail keep
the previous file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _compressed, _native
from fx_sparsify.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def _raw_file(path: Path, entries: dict[str, Any], data: bytes = b"", metadata: dict[str, Any] | None = None) -> Path:
    """A safetensors file written by hand: any header, valid or not."""
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _ours(compressed: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, str]:
    head = {
        "format": _compressed.FORMAT,
        "version": _compressed.VERSION,
        "compressed": compressed,
        "extra": extra or {},
    }
    return {"format": "pt", _compressed.HEADER_KEY: json.dumps(head)}


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``fx-sparsify inspect`` of a damaged file: exit 2 and one clean error line, no traceback."""
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("fx-sparsify: error:"), err
    return err


# --- 1: a claimed shape the data does not back --------------------------------------------------------------
@pytest.mark.parametrize("path_kind", ["native", "numpy", "torch"])
def test_a_huge_empty_shape_decodes_without_looping_over_its_rows(tmp_path: Path, path_kind: str) -> None:
    """``[2**40, 0]`` holds no entry: its bitmask [2**40, 0] and values take 0 bytes. The decoders looped
    over 2**40 empty rows (minutes to hours); the work is bounded by the data. In a subprocess with a timeout."""
    if path_kind == "native" and _native.LIB is None:
        pytest.skip("the C decoder is not built")
    rows = 2**40
    path = _raw_file(
        tmp_path / "empty.safetensors",
        {
            "w.shape": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
            "w.compressed": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
            "w.bitmask": {"dtype": "U8", "shape": [rows, 0], "data_offsets": [16, 16]},
        },
        struct.pack("<qq", rows, 0),
        _ours({"w": "w.weight"}),
    )
    setup = {"native": "", "numpy": "_native.LIB = None", "torch": "_native.LIB = None; _compressed._np = None"}[
        path_kind
    ]
    code = (
        "import sys, fx_sparsify as fxs; from fx_sparsify import _compressed, _native; " + setup + "\n"
        f"w = fxs.load_compressed(sys.argv[1])['w.weight']; assert w.shape == ({rows}, 0), w.shape; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_decoders_return_at_once_for_no_columns() -> None:
    """Each decoder on its own: a [2**40, 0] target is not walked row by row."""
    target = torch.empty(2**40, 0, dtype=torch.int32)
    packed, bits = torch.empty(2**40, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int32)
    _compressed._scatter_np(packed, bits, target)
    if _native.LIB is not None:
        assert _native.expand(packed, bits, target) == 0
    assert _compressed._unpack(packed, 0).shape == (2**40, 0)


# --- 2: header fields of the wrong type ---------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "c.safetensors"
    w = torch.randn(16, 32)
    w[w.abs() < 1] = 0
    fxs.save_compressed({"a.weight": w, "a.bias": torch.randn(16)}, path)
    return path


def _with_header(saved: Path, edit: Any) -> Path:
    """``saved`` with its safetensors header replaced by ``edit(header)`` (the data kept)."""
    raw = saved.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    out = saved.with_name("edited.safetensors")
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return out


def _set_ours(field: str, value: Any) -> Any:
    def edit(header: dict[str, Any]) -> None:
        ours = json.loads(header["__metadata__"][_compressed.HEADER_KEY])
        ours[field] = value
        header["__metadata__"][_compressed.HEADER_KEY] = json.dumps(ours)

    return edit


@pytest.mark.parametrize(
    "name,match",
    [
        (["a", "weight"], r"compressed group 'a' names \['a', 'weight'\], not a tensor name"),
        ({"x": 1}, r"compressed group 'a' names \{'x': 1\}, not a tensor name"),
        (5, r"compressed group 'a' names 5, not a tensor name"),
        (None, r"compressed group 'a' names None, not a tensor name"),
    ],
)
def test_a_tensor_name_that_is_not_a_string(
    saved: Path, name: Any, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _with_header(saved, _set_ours("compressed", {"a": name}))
    with pytest.raises(ValueError, match=match):
        fxs.load_compressed(bad)
    assert "not a tensor name" in _inspect(bad, capsys)


def test_two_groups_naming_one_tensor(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update({f"b.{p}": tensors[f"a.{p}"].clone() for p in ("shape", "compressed", "bitmask", "row_offsets")})
    bad = saved.with_name("twice.safetensors")
    save_file(tensors, str(bad), metadata={**meta, **_ours({"a": "a.weight", "b": "a.weight"})})
    with pytest.raises(ValueError, match=r"groups 'a' and 'b' both name tensor 'a.weight'"):
        fxs.load_compressed(bad)
    assert "both name tensor" in _inspect(bad, capsys)


@pytest.mark.parametrize(
    "offsets,match",
    [
        (5, r"tensor 'a.bias'.*data_offsets must be two ints"),
        ([0], r"tensor 'a.bias'.*data_offsets must be two ints"),
        (["0", "64"], r"tensor 'a.bias'.*data_offsets must be two ints"),
        ([64, 0], r"tensor 'a.bias'.*data_offsets must be two ints \[begin, end\] with 0 <= begin <= end"),
        ([0, 60], r"tensor 'a.bias'.*F32 \[16\] takes 64 bytes, its data_offsets span 60"),
    ],
)
def test_data_offsets_not_a_pair_of_ints(
    saved: Path, offsets: Any, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _with_header(saved, lambda h: h["a.bias"].update(data_offsets=offsets))
    with pytest.raises(ValueError, match=match):
        fxs.load_compressed(bad)
    assert "a.bias" in _inspect(bad, capsys)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h.update({"a.bias": [1, 2]}), r"tensor 'a.bias' must be an object"),
        (lambda h: h["a.bias"].update(shape=[16.0]), r"tensor 'a.bias': shape must be a list of sizes"),
        (lambda h: h["a.bias"].update(shape=[-16]), r"tensor 'a.bias': shape must be a list of sizes"),
        (lambda h: h["a.bias"].update(dtype=4), r"tensor 'a.bias': dtype must be a string"),
        (lambda h: h.update(__metadata__=[1]), r"'__metadata__' must map names to strings"),
    ],
)
def test_other_header_fields_of_the_wrong_type(saved: Path, edit: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxs.load_compressed(_with_header(saved, edit))


def test_a_header_nested_too_deep(tmp_path: Path) -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match="deep.safetensors: not a safetensors file"):
        fxs.load_compressed(path)


# --- 3: an extra entry named like a stored tensor -------------------------------------------------------------
def test_extra_named_like_a_stored_tensor_is_refused(saved: Path) -> None:
    bad = _with_header(saved, _set_ours("extra", {"a.bias": 5}))
    with pytest.raises(ValueError, match=r"extra entries \['a.bias'\] are named like stored tensors"):
        fxs.load_compressed(bad)


def test_json_in_place_of_a_model_tensor_writes_nothing(tmp_path: Path) -> None:
    """The file's biases are JSON numbers: load_state_dict used to write the weights (and the biases before
    the bad one) and then raise. Everything is checked first: the model is unchanged."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    path = tmp_path / "m.safetensors"
    state = {
        k: (torch.zeros_like(v) if k.endswith("weight") else torch.ones_like(v)) for k, v in model.state_dict().items()
    }
    state["3.bias"] = 5  # JSON data where the model has a tensor
    fxs.save_compressed(state, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"JSON data, not a tensor, for \['3.bias'\]"):
        fxs.load_compressed(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- 4: zstd ---------------------------------------------------------------------------------------------------
@pytest.fixture
def zsaved(tmp_path: Path) -> Path:
    pytest.importorskip("zstandard")
    path = tmp_path / "z.safetensors"
    w = torch.randn(64, 64)
    w[w.abs() < 1] = 0
    fxs.save_compressed({"fc.weight": w, "fc.bias": torch.randn(64)}, path, zstd=3)
    return path


def test_a_zstd_file_cut_anywhere_is_an_error(zsaved: Path) -> None:
    raw = zsaved.read_bytes()
    cut = zsaved.with_name("cut.safetensors")
    for keep in [len(raw) - 1, len(raw) - 2, len(raw) - 3, len(raw) - 4, len(raw) - 5, len(raw) // 2, 20, 6]:
        cut.write_bytes(raw[:keep])
        with pytest.raises(ValueError, match=r"cut.safetensors: truncated"):
            fxs.load_compressed(cut)
    cut.write_bytes(raw + raw)
    with pytest.raises(ValueError, match=r"bytes after the zstd frame"):
        fxs.load_compressed(cut)
    assert sorted(p.name for p in zsaved.parent.iterdir()) == ["cut.safetensors", "z.safetensors"]


def test_a_zstd_frame_without_a_checksum_is_refused(zsaved: Path) -> None:
    import zstandard

    plain = zstandard.ZstdDecompressor().decompress(zsaved.read_bytes())
    bare = zsaved.with_name("bare.safetensors")
    bare.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=False).compress(plain))
    with pytest.raises(ValueError, match=r"bare.safetensors: its zstd frame has no checksum"):
        fxs.load_compressed(bare)


def test_every_single_bit_flip_of_a_zstd_file_is_an_error_or_the_same_tensors(zsaved: Path) -> None:
    """The README's promise: never a wrong tensor. A flip in the frame's header fields that zstd ignores may
    load (the same tensors); every other is a ValueError."""
    good = fxs.load_compressed(zsaved)
    raw = zsaved.read_bytes()
    flipped = zsaved.with_name("flipped.safetensors")
    errors = 0
    for i in range(0, len(raw), max(1, len(raw) // 300)):
        for bit in (0, 5):
            damaged = bytearray(raw)
            damaged[i] ^= 1 << bit
            flipped.write_bytes(bytes(damaged))
            try:
                back = fxs.load_compressed(flipped)
            except ValueError:
                errors += 1
                continue
            assert back.keys() == good.keys() and all(torch.equal(back[k], good[k]) for k in good), (i, bit)
    assert errors > 0


def test_a_zstd_bomb_stops_at_the_size_its_header_claims(tmp_path: Path) -> None:
    """A valid safetensors file followed by 512 MiB of zeros, in a ~17 KiB frame: decoding stops as soon as
    the output passes what the header describes, long before 512 MiB reach the disk."""
    zstandard = pytest.importorskip("zstandard")
    small = tmp_path / "small.safetensors"
    fxs.save_compressed({"w": torch.randn(4)}, small)
    comp = zstandard.ZstdCompressor(level=19, write_checksum=True)
    chunks = [small.read_bytes()] + [bytes(1 << 20)] * 512
    bomb = tmp_path / "bomb.safetensors"
    with bomb.open("wb") as f, comp.stream_writer(f, closefd=False) as w:  # no content size: a streamed frame
        for c in chunks:
            w.write(c)
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(ValueError, match=r"bomb.safetensors: its zstd frame decodes to more than the \d+ bytes"):
        fxs.load_compressed(bomb)
    # with the content size in the frame header, the claim disagrees before anything is decoded
    sized = tmp_path / "sized.safetensors"
    sized.write_bytes(comp.compress(b"".join(chunks[:1] + [bytes(1 << 20)] * 8)))
    with pytest.raises(
        ValueError,
        match=r"sized.safetensors: its zstd frame holds \d+ bytes, its safetensors "
        r"header describes \d+",
    ):
        fxs.load_compressed(sized)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.safetensors", "sized.safetensors", "small.safetensors"]


def test_a_zstd_header_claiming_too_much_is_refused_before_decoding_the_body(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    huge = tmp_path / "huge.safetensors"
    writer = zstandard.ZstdCompressor(level=3, write_checksum=True)
    huge.write_bytes(writer.compress(struct.pack("<Q", 2**40) + b"{}"))
    with pytest.raises(ValueError, match=r"huge.safetensors: not a safetensors file"):
        fxs.load_compressed(huge)


# --- 5: a failed save keeps the previous file ------------------------------------------------------------------
@pytest.mark.parametrize("zstd", [None, 3])
def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, zstd: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if zstd is not None:
        pytest.importorskip("zstandard")
    path = tmp_path / "model.safetensors"
    good = {"w": torch.randn(64, 64)}
    fxs.save_compressed(good, path, zstd=zstd)
    before = path.read_bytes()

    def disk_full(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_compressed, "_st_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fxs.save_compressed({"w": torch.zeros(64, 64)}, path, zstd=zstd)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_zstd_save_that_fails_while_compressing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "model.safetensors"
    fxs.save_compressed({"w": torch.randn(64, 64)}, path, zstd=3)
    before = path.read_bytes()

    def fails(self: Any, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        dst.write(b"\x28\xb5\x2f\xfd" + b"half a frame")
        raise OSError(27, "File too large")

    monkeypatch.setattr(zstandard.ZstdCompressor, "copy_stream", fails, raising=False)
    if zstandard.ZstdCompressor.copy_stream is not fails:  # a C type: wrap the module's class instead
        monkeypatch.setattr(
            zstandard,
            "ZstdCompressor",
            type("Failing", (), {"__init__": lambda self, **kw: None, "copy_stream": fails}),
        )
    with pytest.raises(OSError, match="File too large"):
        fxs.save_compressed({"w": torch.zeros(64, 64)}, path, zstd=3)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_new_checkpoint_gets_the_usual_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    fxs.save_compressed({"w": torch.randn(4)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
