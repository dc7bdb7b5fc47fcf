"""Compressed checkpoints: sparse tensors as non-zero values plus a packed 1-bit mask (SPEC §11).

    >>> fxs.save_compressed(squashed, "model.safetensors")                  # doctest: +SKIP
    >>> state = fxs.load_compressed("model.safetensors")                     # the dense state_dict
    >>> model = fxs.load_compressed("model.safetensors", MyModel())          # loaded into a model

The file is a plain safetensors file. A tensor that is smaller stored sparse is written in the layout
of ``compressed-tensors``' ``sparse-bitmask`` format, under the tensor's name without its ``.weight``
suffix (``fc1.weight`` → ``fc1``):

- ``fc1.shape``       int64 ``[ndim]``: the dense shape;
- ``fc1.compressed``  the entries whose bits are not all zero, row-major, in the tensor's dtype;
- ``fc1.bitmask``     uint8 ``[rows, ceil(cols / 8)]``: one bit per entry, least significant bit first
  (``numpy.packbits(..., bitorder="little")``), rows = ``shape[0]``, cols = the other dims flattened;
- ``fc1.row_offsets`` int32 ``[rows]`` (int64 past 2**31 values): where each row starts in ``compressed``.

Every other tensor is stored as it is. The safetensors metadata holds ``"fx_sparsify"``: a JSON
header with the format name, its version, which stored name each compressed tensor had, and the
non-tensor entries of the state dict (``_extra_state``) that are JSON. An entry is "kept" when any of
its bits is set, so ``-0.0`` and NaN round-trip: loading is bit-exact. Files written by
``compressed-tensors`` (no header; every ``P.shape`` / ``P.compressed`` / ``P.bitmask`` group is
read as ``P.weight``) load as well.

Decoding runs in C (``_kernels.c`` via :mod:`._native`) where the optional kernels were built, else with
numpy, else with torch alone: the same tensors, bit for bit.

With ``zstd=LEVEL`` (the ``zstd`` extra: ``pip install fx-sparsify[zstd]``) the whole safetensors
file is wrapped in one zstd frame; :func:`load_compressed` recognises the frame by its magic number.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file
from torch import Tensor, nn

from . import _native
from ._bitmask import install_from_checkpoint
from ._checkpoint import INDEX, read_index
from ._checkpoint_files import ZSTD_MAGIC, decompress, read_header, write_atomically, zstandard

try:  # numpy packs and scatters bits ~10x faster than the torch fallback; optional
    import numpy as _np
except ModuleNotFoundError:  # pragma: no cover - exercised by monkeypatching _np in the tests
    _np = None  # type: ignore[assignment]

__all__ = ["FORMAT", "VERSION", "save_compressed", "load_compressed"]

#: the format name written in the header (and the ``compressed-tensors`` format it follows)
FORMAT = "sparse-bitmask"
#: the header version this module writes and reads
VERSION = 1
#: the safetensors metadata entry holding our JSON header
HEADER_KEY = "fx_sparsify"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")

#: dtype → the integer dtype of the same width, whose bits decide "non-zero" and carry the values
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --- bits ------------------------------------------------------------------------------------------------
def _as_bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.element_size()])


def _pack(keep: Tensor) -> Tensor:
    """``[rows, cols]`` bool → ``[rows, ceil(cols / 8)]`` uint8, least significant bit first."""
    if _np is not None:
        return torch.from_numpy(_np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    rows, cols = keep.shape
    padded = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = keep
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # byte → its 8 bits, LSB first


def _unpack(packed: Tensor, cols: int) -> Tensor:
    """The inverse of :func:`_pack`: ``[rows, cols]`` bool."""
    if _np is not None:
        return torch.from_numpy(_np.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little").view(bool))
    rows = packed.shape[0]
    if packed.numel() == 0:
        return torch.zeros(rows, cols, dtype=torch.bool)
    return _TABLE.index_select(0, packed.reshape(-1).int()).view(rows, -1)[:, :cols]


def _gather(flat: Tensor, keep: Tensor) -> Tensor:
    """The entries of ``flat`` where ``keep`` is set, row-major, as a 1-D tensor of ``flat``'s dtype."""
    if _np is None:
        return flat[keep]
    return torch.from_numpy(_as_bits(flat).numpy()[keep.numpy()]).view(flat.dtype)


#: entries decoded per chunk: a chunk's mask, ranks and values stay in the CPU caches (128 Ki: 512 KiB of ranks)
CHUNK = 1 << 17


def _blocks(rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` pieces of a ``[rows, cols]`` grid of about :data:`CHUNK` entries each.

    Whole rows where a row is shorter than a chunk, else pieces of one row that start on a byte of
    the bitmask (``c0`` a multiple of 8). Each piece is contiguous in the row-major dense tensor.
    """
    if cols > CHUNK:
        width = max(8, CHUNK // 8 * 8)  # whole bytes of the bitmask
        return [(r, r + 1, c, min(cols, c + width)) for r in range(rows) for c in range(0, cols, width)]
    step = max(1, CHUNK // max(cols, 1))
    return [(r, min(rows, r + step), 0, cols) for r in range(0, rows, step)]


def _scatter_np(packed: Tensor, bits: Tensor, target: Tensor) -> None:
    """Write the dense ``[rows, cols]`` integer view ``target`` from a packed mask and the kept entries.

    A chunk of about :data:`CHUNK` entries at a time, so the unpacked mask and the indices of its set
    bits stay in the CPU caches (one pass over the whole tensor each was ~1.4x slower): zero the chunk
    of ``target`` and write its values at ``flatnonzero`` of its mask. Every entry of ``target`` is
    written, so it may be uninitialised memory. (Measured slower on the CPU: ``masked_scatter_``,
    which branches on every entry of a random mask, and a branch-free ``cumsum`` + ``index_select``
    gather, which costs ~3 ns an entry whatever the sparsity.)
    """
    rows, cols = target.shape
    if rows == 0 or cols == 0:  # no entry: never walk a claimed [2**40, 0] row by row
        return
    mask, source, dense = packed.numpy(), bits.numpy(), target.numpy()
    start = 0
    for r0, r1, c0, c1 in _blocks(rows, cols):
        keep = _np.unpackbits(mask[r0:r1, c0 // 8 : (c1 + 7) // 8], axis=-1, count=c1 - c0, bitorder="little")
        where = _np.flatnonzero(keep.view(bool))  # numpy's nonzero has a fast path for bool (~4x uint8's)
        piece = dense[r0:r1, c0:c1].reshape(-1)  # a view: the block is contiguous
        piece.fill(0)
        piece[where] = source[start : start + where.size]
        start += where.size


def _scatter_native(packed: Tensor, bits: Tensor, target: Tensor) -> None:
    """:func:`_scatter_np` in C (``_kernels.c``): one pass, ~0.5 ns an entry whatever the sparsity."""
    used = _native.expand(packed, bits, target)
    if used != bits.numel():  # pragma: no cover - _validate counted the bits before
        raise ValueError(f"the bitmask marks {'more' if used < 0 else used} entries, {bits.numel()} values are stored")


def _scatter(packed: Tensor, values: Tensor, shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
    """A dense tensor of ``shape`` holding ``values`` where the packed mask is set and +0.0 elsewhere.

    With ``out`` (a contiguous CPU tensor of that shape and dtype) the result is written into it.
    """
    rows, cols = _grid(shape)
    bits = _as_bits(values)
    if out is None:
        # torch's allocator, not numpy's: numpy asks for transparent huge pages, and the kernel's compaction
        # for those made a first load in a fresh process ~4x slower here (1.6 s against 0.36 s for 720 MB)
        out = torch.empty(shape, dtype=values.dtype, device="cpu")
    target = _as_bits(out.detach()).view(rows, cols)
    with torch.no_grad():
        if _native.LIB is not None:
            if bits.data_ptr() % bits.element_size():  # a file whose values start off their alignment
                bits = bits.clone()
            _scatter_native(packed.contiguous(), bits.contiguous(), target)
        elif _np is not None:
            _scatter_np(packed, bits, target)
        else:
            target.zero_().view(-1).masked_scatter_(_unpack(packed, cols).reshape(-1), bits)
    return out


def _count_bits(packed: Tensor, cols: int) -> int:
    """Set bits among the first ``cols`` bits of each row of a packed ``[rows, ceil(cols / 8)]`` mask."""
    full, rem = divmod(cols, 8)
    body, tail = packed[:, :full], packed[:, full] & ((1 << rem) - 1) if rem else None
    if _np is not None and hasattr(_np, "bitwise_count"):  # numpy >= 2.0
        count = int(_np.bitwise_count(body.numpy()).sum(dtype=_np.int64))
        return count + (int(_np.bitwise_count(tail.numpy()).sum(dtype=_np.int64)) if tail is not None else 0)
    count = int(_POPCOUNT[body.reshape(-1).long()].sum())
    return count + (int(_POPCOUNT[tail.long()].sum()) if tail is not None else 0)


_POPCOUNT = _TABLE.sum(dim=1)  # byte → number of set bits


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a tensor's bitmask is packed in: rows = first dim, cols = the rest flattened."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _compressed_bytes(t: Tensor, nnz: int) -> int:
    rows, cols = _grid(tuple(t.shape))
    return nnz * t.element_size() + rows * math.ceil(cols / 8) + rows * 4 + t.dim() * 8


def _prefix(name: str) -> str:
    """The stored name of a compressed tensor: the ``compressed-tensors`` one (``.weight`` dropped)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


# --- save ------------------------------------------------------------------------------------------------
def _state_of(obj: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    state = vars(obj).get("_fxs") if isinstance(obj, nn.Module) else None
    if state is not None and getattr(state.spec, "mode", "graph") != "inplace":  # a SparseGraphModule, graph mode
        raise ValueError(
            "save_compressed(sgm): a sparse module's state dict holds its unpruned weights beside the masks, so "
            "nothing would be stored smaller; to ship the pruned model, save_compressed(sgm.squash(), path) (after "
            "sgm.step()); to keep the sparse module resumable, save_compressed(sgm.state_dict(), path)"
        )
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(
        f"save_compressed() takes an nn.Module or a state dict (a mapping of names to tensors), got "
        f"{type(obj).__name__}"
    )


def _compress(t: Tensor) -> dict[str, Tensor] | None:
    """The four ``sparse-bitmask`` parts of ``t``, or None when storing it dense is smaller."""
    if not t.is_floating_point() or t.dim() == 0 or t.numel() == 0 or t.element_size() not in _BITS:
        return None
    flat = t.reshape(_grid(tuple(t.shape)))
    keep = _as_bits(flat) != 0
    nnz = int(keep.sum())
    if _compressed_bytes(t, nnz) >= t.numel() * t.element_size():
        return None
    row_counts = keep.sum(dim=1)
    offsets = torch.cumsum(row_counts, 0) - row_counts
    return {
        "shape": torch.tensor(list(t.shape), dtype=torch.int64),
        "compressed": _gather(flat, keep),
        "bitmask": _pack(keep),
        "row_offsets": offsets.int() if nnz < 2**31 else offsets,  # int32 where it fits (4 bytes a row)
    }


def save_compressed(
    module_or_state_dict: nn.Module | Mapping[str, Any], path: str | os.PathLike[str], *, zstd: int | None = None
) -> None:
    """Write a state dict (or ``module.state_dict()``) as a compressed safetensors file at ``path``.

    Each floating-point tensor that takes fewer bytes as non-zero values + a 1-bit mask is stored so
    (a 50 % sparse fp32 tensor takes ~0.53x its dense bytes, a 90 % sparse one ~0.13x); all others are
    stored as they are. Non-tensor entries (``_extra_state``) must be JSON data. ``zstd=LEVEL`` (1–22)
    wraps the file in a zstd frame (the ``zstd`` extra). :func:`load_compressed` reads it back bit-exact.
    """
    state = _state_of(module_or_state_dict)
    tensors: dict[str, Tensor] = {}
    names: dict[str, str] = {}  # stored prefix → state dict name
    extra: dict[str, Any] = {}
    seen: set[int] = set()
    dense_names = {k for k, v in state.items() if isinstance(v, Tensor)}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"save_compressed(): state dict entry {name!r} is a {type(value).__name__}, neither a tensor "
                    "nor JSON data; drop it from the state dict before saving"
                ) from None
            extra[name] = value
            continue
        t = value.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        parts = _compress(t.contiguous())
        prefix = _prefix(name)
        keys = [f"{prefix}.{p}" for p in PARTS]
        if parts is not None and not any(k in dense_names or k in tensors for k in keys):
            names[prefix] = name
            tensors.update(zip(keys, (parts[p] for p in PARTS)))
            continue
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:  # a tied tensor: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    header = {"format": FORMAT, "version": VERSION, "compressed": names, "extra": extra}
    metadata = {"format": "pt", HEADER_KEY: json.dumps(header)}
    path = Path(os.fspath(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"save_compressed(): the folder {str(path.parent)!r} of {str(path)!r} does not exist; create it first"
        )
    # written straight to disk, never as one bytes object: that (and safetensors' buffer behind it) cost
    # ~1.1x the file in memory on top of the compressed tensors (LLaMA-1.1B bf16: 7.06 GiB peak at the save).
    # Into a temporary file renamed over `path` at the end: a failed save keeps the previous checkpoint
    if zstd is None:
        write_atomically(path, lambda temporary: _st_save_file(tensors, str(temporary), metadata=metadata))
        return
    compressor = zstandard().ZstdCompressor(level=int(zstd), write_checksum=True)  # a damaged frame fails to load

    def write_zstd(temporary: Path) -> None:
        plain = temporary.with_name(f"{temporary.name}.uncompressed")
        try:
            _st_save_file(tensors, str(plain), metadata=metadata)
            with plain.open("rb") as src, temporary.open("wb") as dst:
                compressor.copy_stream(src, dst, size=plain.stat().st_size)  # the size in the frame header
        finally:
            plain.unlink(missing_ok=True)

    write_atomically(path, write_zstd)


# --- load ------------------------------------------------------------------------------------------------
def _our_header(path: Path, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(HEADER_KEY)
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: the {HEADER_KEY!r} header is not JSON: {raw[:80]!r}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ValueError(
            f"{path}: unknown checkpoint format {got!r:.80} in the {HEADER_KEY!r} header; this "
            f"fx_sparsify reads {FORMAT!r}"
        )
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {header.get('version')!r}; this fx_sparsify reads "
            f"version {VERSION}: upgrade fx_sparsify to read it"
        )
    if not isinstance(header.get("compressed"), dict) or not isinstance(header.get("extra", {}), dict):
        raise ValueError(f"{path}: malformed {HEADER_KEY!r} header: 'compressed' and 'extra' must be objects")
    named: dict[str, str] = {}  # tensor name → the group naming it
    for prefix, name in header["compressed"].items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{path}: malformed {HEADER_KEY!r} header: compressed group {prefix!r} names "
                f"{name!r:.60}, not a tensor name (a non-empty string)"
            )
        if name in named:
            raise ValueError(
                f"{path}: malformed {HEADER_KEY!r} header: compressed groups {named[name]!r} and "
                f"{prefix!r} both name tensor {name!r}; the file is damaged: write it again"
            )
        named[name] = prefix
    return header


def _validate(path: Path, name: str, parts: dict[str, Tensor]) -> tuple[int, ...]:
    """The dense shape of a compressed tensor; ValueError naming ``name`` when its parts disagree.

    Reads only the small parts and counts the bitmask's bits, so a whole file is checked before any
    tensor is expanded (a failed load writes nothing into a model).
    """
    where = f"{path}: tensor {name!r}"
    missing = [p for p in PARTS[:3] if p not in parts]
    if missing:
        raise ValueError(f"{where}: compressed parts {missing} are missing from the file")
    shape_t, values, packed = parts["shape"], parts["compressed"], parts["bitmask"]
    if shape_t.dim() != 1 or shape_t.is_floating_point() or bool((shape_t < 0).any()) or shape_t.numel() == 0:
        raise ValueError(f"{where}: its shape part must be a 1-D tensor of sizes, got {shape_t.tolist()}")
    shape = tuple(int(s) for s in shape_t.tolist())
    if math.prod(shape) >= 2**62:
        raise ValueError(
            f"{where}: its shape part {list(shape)} holds {math.prod(shape)} entries, more than any tensor "
            "can; the file is corrupt"
        )
    rows, cols = _grid(shape)
    if values.dim() != 1 or not values.is_floating_point() or values.element_size() not in _BITS:
        raise ValueError(f"{where}: its values must be a 1-D floating tensor, got {values.dtype} {tuple(values.shape)}")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, math.ceil(cols / 8)):
        raise ValueError(
            f"{where}: its bitmask must be uint8 of shape {(rows, math.ceil(cols / 8))} for shape "
            f"{shape}, got {packed.dtype} {tuple(packed.shape)}"
        )
    count = _count_bits(packed, cols)
    if count != values.numel():
        raise ValueError(
            f"{where}: the bitmask marks {count} entries but {values.numel()} values are stored; the file is corrupt"
        )
    offsets = parts.get("row_offsets")
    if offsets is not None and (offsets.dim() != 1 or offsets.numel() != rows):
        raise ValueError(f"{where}: row_offsets must have one entry per row ({rows}), got {tuple(offsets.shape)}")
    return shape


def _expand(parts: dict[str, Tensor], shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
    """The dense tensor of validated parts (written into ``out`` when given)."""
    return _scatter(parts["bitmask"], parts["compressed"], shape, out)


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors (mapped from disk, not read into memory) and its safetensors metadata."""
    with path.open("rb") as f:
        magic = f.read(4)
    source = decompress(path) if magic == ZSTD_MAGIC else path
    try:
        header, _ = read_header(path, source)
        metadata = header.get("__metadata__") or {}
        try:
            tensors = _st_load_file(str(source))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file: {err}") from None
    finally:
        if source != path:  # the mapping outlives the name on POSIX; elsewhere remove it at exit
            try:
                source.unlink()
            except OSError:  # pragma: no cover - Windows: a mapped file cannot be removed
                atexit.register(source.unlink, missing_ok=True)
    return tensors, metadata


def load_compressed(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, strict: bool = True, storage: str = "dense"
) -> Any:
    """Read a file written by :func:`save_compressed` (or by ``compressed-tensors``' sparse-bitmask).

    Without ``model``: returns the dense state dict, bit-exact. With ``model``: loads it into the
    model (``strict`` like ``load_state_dict``: missing or unexpected keys and shape mismatches are a
    ``ValueError`` naming them) and returns the model. A damaged file (truncated, a foreign or newer
    header, a bitmask that disagrees with its values) is a ``ValueError`` naming the tensor. ``path`` may also
    be a folder of shards with a Hugging Face ``model.safetensors.index.json`` (what ``prune_streamed`` writes).
    ``storage="bitmask"`` (with ``model``): each compressed weight of a ``Linear`` / 1×1 ``Conv`` becomes a
    bitmask-storage layer built from the file's values and mask, never expanded.
    """
    if storage not in ("dense", "bitmask") or (storage == "bitmask" and model is None):
        raise ValueError(f"load_compressed(storage={storage!r}): use 'dense', or 'bitmask' with a model to load into")
    path = Path(os.fspath(path))
    if path.is_dir():  # a folder of shards with an index (what prune_streamed writes)
        return _load_folder(path, model, strict, storage)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (working directory: {os.getcwd()})")
    tensors, metadata = _load_tensors(path)
    header = _our_header(path, metadata)
    if header is not None:
        names = dict(header["compressed"])
    else:  # a compressed-tensors file: every complete group is a weight
        groups = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".bitmask")}
        names = {g: f"{g}.weight" for g in groups}
    state: dict[str, Any] = {}
    grouped: dict[str, dict[str, Tensor]] = {p: {} for p in names}
    for key, t in tensors.items():
        prefix, _, part = key.rpartition(".")
        if prefix in grouped and part in PARTS:
            grouped[prefix][part] = t
        else:
            state[key] = t
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, name in names.items():
        if name in state:
            raise ValueError(f"{path}: tensor {name!r} is stored both dense and compressed")
        shapes[name] = _validate(path, name, grouped[prefix])
    extra = header.get("extra", {}) if header is not None else {}
    clash = sorted(k for k in extra if k in state or k in shapes)
    if clash:
        raise ValueError(
            f"{path}: the {HEADER_KEY!r} header's extra entries {clash[:8]} are named like stored "
            "tensors; the file is damaged: write it again"
        )
    if model is None:
        for prefix, name in names.items():
            state[name] = _expand(grouped[prefix], shapes[name])
        state.update(extra)
        return state
    file_shapes = {**{k: tuple(v.shape) for k, v in state.items()}, **shapes}
    _check_keys(path, model, file_shapes, set(extra), strict)
    installed = bool(names) and storage == "bitmask"
    if installed:  # the weights of Linear / 1x1 conv layers stay as the file holds them (their biases load below)
        names = install_from_checkpoint(model, names, grouped, shapes)
    # expand straight into the model's own tensors where they are plain CPU tensors of the same kind,
    # after everything else has loaded (load_state_dict may still refuse: then nothing was written)
    live = dict(model.named_buffers(remove_duplicate=False))
    live.update(model.named_parameters(remove_duplicate=False))
    direct = {}
    for prefix, name in names.items():
        target, values = live.get(name), grouped[prefix]["compressed"]
        if (
            target is not None
            and target.device.type == "cpu"
            and target.is_contiguous()
            and target.dtype == values.dtype
            and tuple(target.shape) == shapes[name]
        ):
            direct[name] = (target, prefix)
        else:
            state[name] = _expand(grouped[prefix], shapes[name])
    state.update(extra)
    meta = any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])  # an empty model: assign
    model.load_state_dict(state, strict=strict and not direct and not installed, assign=meta)
    for name, (target, prefix) in direct.items():
        _expand(grouped[prefix], shapes[name], out=target)
        # written through its memory, not an in-place op: bump the version as copy_ would (autograd's
        # saved-tensor check, the eval cache of weight * mask)
        torch.autograd.graph.increment_version(target)
    return model


M = TypeVar("M", bound=Mapping[str, Any])


def _load_folder(path: Path, model: nn.Module | None, strict: bool, storage: str = "dense") -> Any:
    """The shards listed in the folder's Hugging Face index, one after the other, as one checkpoint.

    With ``model``, every shard is checked against it (keys and shapes) before any is loaded into it.
    """
    index = path / INDEX
    if not index.is_file():
        raise FileNotFoundError(
            f"{path}: a folder without {INDEX}, so not a finished sharded checkpoint (prune_streamed writes the "
            "index last); load one of its files, or run again"
        )
    shards = sorted(set(read_index(path).values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ValueError(f"{path}: shard(s) {', '.join(map(repr, missing))} listed in {INDEX} are missing")
    owner: dict[str, str] = {}  # tensor name -> the shard holding it
    if model is None:
        state: dict[str, Any] = {}
        for s in shards:
            state.update(_one_shard_each(path, owner, load_compressed(path / s), s))
        return state
    shapes: dict[str, tuple[int, ...]] = {}
    extra: set[str] = set()
    for s in shards:
        tensors, metadata = _load_tensors(path / s)
        header = _our_header(path / s, metadata)
        if header is not None:
            names = dict(header["compressed"])
            extra |= set(header.get("extra", {}))
        else:
            names = {g: f"{g}.weight" for g in {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".bitmask")}}
        grouped: dict[str, dict[str, Tensor]] = {p: {} for p in names}
        here: dict[str, tuple[int, ...]] = {}
        for key, t in tensors.items():
            prefix, _, part = key.rpartition(".")
            if prefix in grouped and part in PARTS:
                grouped[prefix][part] = t
            else:
                here[key] = tuple(t.shape)
        here.update({name: _validate(path / s, name, grouped[prefix]) for prefix, name in names.items()})
        shapes.update(_one_shard_each(path, owner, here, s))
        del tensors, grouped
    _check_keys(path, model, shapes, extra, strict)
    for s in shards:
        load_compressed(path / s, model, strict=False, storage=storage)
    return model


def _one_shard_each(path: Path, owner: dict[str, str], found: M, shard: str) -> M:
    """``found`` (shard ``shard``'s names), its names recorded in ``owner``; a tensor in two shards is a ValueError
    naming it (a silent last-one-wins would load either copy)."""
    twice = next((k for k in found if k in owner), None)
    if twice is not None:
        raise ValueError(f"{path}: tensor {twice!r} is in both {owner[twice]!r} and {shard!r}; the shards are damaged")
    owner.update(dict.fromkeys(found, shard))
    return found


def _check_keys(
    path: Path, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], extra: set[str], strict: bool
) -> None:
    """A ValueError naming missing / unexpected keys (strict) and shape mismatches, before anything is written."""
    expected = model.state_dict()
    tensors = sorted(k for k in extra if isinstance(expected.get(k), Tensor))
    if tensors:  # load_state_dict would write the tensors before it before refusing these
        raise ValueError(
            f"load_compressed({str(path)!r}, {type(model).__name__}): the file holds JSON data, not a "
            f"tensor, for {tensors[:8]}; load into the model the file was saved from"
        )
    keys = set(shapes) | extra
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(k for k in keys if k not in expected)

    def listed(names: list[str]) -> str:
        return ", ".join(map(repr, names[:8])) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    if strict and (missing or unexpected):
        parts = ([f"missing from the file: {listed(missing)}"] if missing else []) + (
            [f"not in the model: {listed(unexpected)}"] if unexpected else []
        )
        raise ValueError(
            f"load_compressed({str(path)!r}, {type(model).__name__}): the keys do not match ("
            + "; ".join(parts)
            + "); load into the model the file was saved from, or pass strict=False"
        )
    for k, shape in shapes.items():
        if k in expected and isinstance(expected[k], Tensor) and shape != tuple(expected[k].shape):
            raise ValueError(
                f"load_compressed({str(path)!r}): tensor {k!r} has shape {shape} in the file "
                f"and {tuple(expected[k].shape)} in the model"
            )
