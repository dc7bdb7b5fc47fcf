"""The file layer of compressed checkpoints (``_compressed.py``): what a file may claim, checked before it is used.

- :func:`read_header`: the safetensors header, checked as a schema (every entry an object with a
  ``dtype`` string, a ``shape`` of sizes and ``data_offsets`` of two ordered ints inside the file, its
  byte count the shape's) before any field is used: a damaged or hostile header is a ``ValueError``
  naming the file and the entry, never a ``TypeError`` / ``IndexError`` from deep inside.
- :func:`decompress`: a zstd file is accepted only as one whole frame with a checksum (a cut or a
  flipped bit is then always an error, never a wrong tensor); its frame is walked block by block
  before anything is decoded, the safetensors header is read and checked from the first decoded bytes,
  and decoding stops with an error as soon as the output passes the size that header claims (a small
  zstd "bomb" is never written to disk in full).
- :func:`write_atomically`: the destination is replaced by a complete, flushed file or not at all.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["MAX_HEADER", "ZSTD_MAGIC", "check_header", "decompress", "read_header", "write_atomically", "zstandard"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: the largest safetensors JSON header read (safetensors' own limit, its ``MAX_HEADER_SIZE``)
MAX_HEADER = 100_000_000
#: bytes per entry of each safetensors dtype whose size is whole bytes (others are left to safetensors)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: bytes decoded per read of a zstd frame (the most held in memory at once)
CHUNK = 1 << 20


def zstandard() -> Any:
    """The ``zstandard`` module, or an ImportError naming the extra that installs it."""
    try:
        import zstandard as module
    except ModuleNotFoundError:
        raise ImportError(
            "zstd-compressed checkpoints need the 'zstandard' package: pip install fx-sparsify[zstd] "
            "(or save without zstd=)"
        ) from None
    return module


# --- the safetensors header ------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_header(path: Path, header: Any, data_size: int | None) -> int:
    """Check a parsed safetensors header as a schema; returns where the data ends (the largest end offset).

    ``data_size`` is the byte count after the header, where known: an entry ending past it is truncation.
    """
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise ValueError(f"{path}: damaged header: '__metadata__' must map names to strings")
            continue
        where = f"{path}: damaged header: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where} must be an object with dtype, shape and data_offsets, got {type(entry).__name__}"
            )
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ValueError(f"{where}: dtype must be a string such as 'F32', got {dtype!r:.60}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise ValueError(f"{where}: shape must be a list of sizes >= 0, got {shape!r:.60}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(
                f"{where}: data_offsets must be two ints [begin, end] with 0 <= begin <= end, got {offsets!r:.60}"
            )
        if data_size is not None and offsets[1] > data_size:
            raise ValueError(
                f"{path}: truncated: tensor {name!r} ends at byte {offsets[1]} of the data, the file "
                f"holds {data_size}; write the file again"
            )
        size = DTYPE_BYTES.get(dtype)
        if size is not None and offsets[1] - offsets[0] != math.prod(shape) * size:
            raise ValueError(
                f"{where}: {dtype} {shape} takes {math.prod(shape) * size} bytes, its data_offsets "
                f"span {offsets[1] - offsets[0]}"
            )
        end = max(end, offsets[1])
    return end


def _parse(path: Path, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a safetensors file: its header is not JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a safetensors file: its header nests too deep") from None


def _header_length(path: Path, head: bytes, available: int | None) -> int:
    """The header's byte count from the file's first 8 bytes; ``available``: the bytes after them, where known."""
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(head)} bytes; the header length alone takes 8)")
    (n,) = struct.unpack("<Q", head)
    if available is not None and n > available:
        raise ValueError(
            f"{path}: not a safetensors file or truncated: the header says {n} bytes, the file has "
            f"{available} after the length"
        )
    if n > MAX_HEADER:
        raise ValueError(
            f"{path}: not a safetensors file: the header says {n} bytes, more than the {MAX_HEADER} "
            "a safetensors header may take"
        )
    return n


def read_header(path: Path, source: Path) -> tuple[dict[str, Any], int]:
    """The checked safetensors JSON header and the data's byte count; ValueError naming what is wrong.

    ``source`` holds the bytes (``path`` itself, or the decompressed copy of a zstd file); errors name ``path``.
    """
    size = source.stat().st_size
    with source.open("rb") as f:
        n = _header_length(path, f.read(8), size - 8)
        header = _parse(path, f.read(n))
    check_header(path, header, size - 8 - n)
    return header, size - 8 - n


# --- zstd ------------------------------------------------------------------------------------------------
def _frame(path: Path, f: BinaryIO, size: int) -> int | None:
    """Walk the one zstd frame of the file: its content size (None when the header does not say it).

    A ValueError for a frame without a checksum, a dictionary, a reserved block type, a cut anywhere
    (inside the checksum too) and bytes after the frame. Reads 3 bytes a block, nothing is decoded.
    """
    head = f.read(18)
    if len(head) < 6 or head[:4] != ZSTD_MAGIC:
        raise ValueError(f"{path}: truncated zstd file ({size} bytes); write the file again")
    descriptor = head[4]
    fcs_flag, single, checksum, dict_flag = (
        descriptor >> 6,
        (descriptor >> 5) & 1,
        (descriptor >> 2) & 1,
        descriptor & 3,
    )
    if not checksum:
        raise ValueError(
            f"{path}: its zstd frame has no checksum, so damage could decode to a wrong tensor "
            "unnoticed; compress it with a checksum (zstd --check, or save_compressed(..., zstd=LEVEL))"
        )
    if dict_flag or descriptor & 0x08:
        raise ValueError(
            f"{path}: a zstd frame with a dictionary or reserved flags; write the file with "
            "save_compressed(..., zstd=LEVEL)"
        )
    pos = 5 + (0 if single else 1)
    fcs_bytes = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if len(head) < pos + fcs_bytes:
        raise ValueError(f"{path}: truncated zstd file ({size} bytes); write the file again")
    content = int.from_bytes(head[pos : pos + fcs_bytes], "little") + (256 if fcs_bytes == 2 else 0)
    pos += fcs_bytes
    while True:
        f.seek(pos)
        block = f.read(3)
        if len(block) < 3:
            raise ValueError(f"{path}: truncated zstd frame (cut at byte {size}); write the file again")
        word = int.from_bytes(block, "little")
        last, kind, length = word & 1, (word >> 1) & 3, word >> 3
        if kind == 3:
            raise ValueError(
                f"{path}: a damaged zstd frame (a reserved block type at byte {pos}); write the file again"
            )
        pos += 3 + (1 if kind == 1 else length)
        if last:
            break
    pos += 4  # the checksum
    if pos > size:
        raise ValueError(
            f"{path}: truncated zstd frame (cut at byte {size}, the frame ends at {pos}); write the file again"
        )
    if pos < size:
        raise ValueError(
            f"{path}: {size - pos} bytes after the zstd frame (another frame, or a damaged file); "
            "a checkpoint is one frame: write the file again"
        )
    return content if fcs_bytes else None


def _copy(reader: Any, dst: BinaryIO, count: int) -> None:
    """Copy up to ``count`` decoded bytes from ``reader`` to ``dst``, a chunk at a time."""
    while count > 0:
        piece = reader.read(min(count, CHUNK))
        if not piece:
            return
        dst.write(piece)
        count -= len(piece)


def _read_exact(reader: Any, count: int) -> bytes:
    parts, got = [], 0
    while got < count:
        piece = reader.read(min(count - got, CHUNK))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _decode(path: Path, src: BinaryIO, dst: BinaryIO, content: int | None) -> None:
    """Decode the frame into ``dst``, never past the size the safetensors header in its first bytes claims."""
    reader = zstandard().ZstdDecompressor().stream_reader(src, read_across_frames=False)
    head = _read_exact(reader, 8)
    n = _header_length(path, head, None if content is None else content - 8)
    raw = _read_exact(reader, n)
    if len(raw) < n:
        raise ValueError(f"{path}: truncated: the zstd frame ends inside the safetensors header; write the file again")
    claim = 8 + n + check_header(path, _parse(path, raw), None)
    if content is not None and content != claim:
        raise ValueError(
            f"{path}: its zstd frame holds {content} bytes, its safetensors header describes {claim}; "
            "the file is damaged: write it again"
        )
    dst.write(head)
    dst.write(raw)
    _copy(reader, dst, claim - 8 - n)
    if dst.tell() < claim:
        raise ValueError(
            f"{path}: truncated: the zstd frame decodes to {dst.tell()} bytes, its safetensors header "
            f"describes {claim}; write the file again"
        )
    if reader.read(1):  # reading to the frame's end also checks its checksum
        raise ValueError(
            f"{path}: its zstd frame decodes to more than the {claim} bytes its safetensors header "
            "describes; the file is damaged: write it again"
        )


def decompress(path: Path) -> Path:
    """A zstd file decoded as a stream into a temporary file beside it (or in the temp folder if that folder is
    read-only): never the whole file in memory. Everything is checked on the way (see the module's doc); a
    ValueError names the file, and no temporary file stays."""
    zstd = zstandard()
    for folder in (path.parent, Path(tempfile.gettempdir())):
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".uncompressed", dir=folder)
            break
        except OSError:
            continue
    else:  # pragma: no cover - no writable folder at all
        raise OSError(f"load_compressed({str(path)!r}): no writable folder for the decompressed copy")
    try:
        with path.open("rb") as src, os.fdopen(fd, "wb") as dst:
            content = _frame(path, src, path.stat().st_size)
            src.seek(0)
            _decode(path, src, dst, content)
    except zstd.ZstdError as err:
        Path(name).unlink(missing_ok=True)
        raise ValueError(f"{path}: a damaged zstd frame ({err}); write the file again") from None
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


# --- writing ---------------------------------------------------------------------------------------------
def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` a file in ``path``'s folder, flush it to disk, then rename it over ``path``: a
    failed or killed save leaves the previous file as it was (and no temporary file where it failed)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        # the mode open() gives a new file (the umask's), or the replaced file's (safetensors writes 0o600)
        mode = (path if path.exists() else temporary).stat().st_mode & 0o7777
        write(temporary)
        os.chmod(temporary, mode)
        with temporary.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk with the folder's entry
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
