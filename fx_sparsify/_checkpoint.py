"""Reading a model's weights a few tensors at a time from safetensors files, and building it without them.

:class:`Checkpoint` opens a safetensors file, or a folder of shards (with a Hugging Face
``model.safetensors.index.json``, or every ``*.safetensors`` file in it), reads only the headers, and
then copies single tensors from disk into tensors it allocates (plain reads: no memory map, so the
process's resident memory holds only what was asked for). :func:`parameters_on_meta` builds a model
whose parameters live on the meta device (no memory) while its buffers are built as usual (rotary
frequencies and other non-persistent buffers keep their values); :func:`materialise` and
:func:`release` move the parameters of some modules onto the CPU from the checkpoint and back.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ._checkpoint_files import read_header

__all__ = ["Checkpoint", "INDEX", "read_index", "parameters_on_meta", "materialise", "release"]

#: the Hugging Face index of a sharded checkpoint (and of the folders prune_streamed writes)
INDEX = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path``, checked as a schema (:func:`read_header`: every entry's dtype, shape and
    data offsets inside the file, the header's length bounded), and the byte offset where its data starts."""
    header, data = read_header(path, path)
    header.pop("__metadata__", None)
    return header, path.stat().st_size - data


def _plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )


def read_index(folder: Path) -> dict[str, str]:
    """The weight map (tensor name → shard file) of the folder's Hugging Face index, checked: a JSON object whose
    ``weight_map`` maps names to file names in the folder itself (a path, ``..`` or an absolute name would read a
    file outside it); anything else is a ``ValueError`` naming the index and the entry."""
    index = folder / INDEX
    what = "not a Hugging Face index (a JSON object with a 'weight_map' object of tensor name -> shard file name)"
    try:
        data = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{index}: {what}: {type(err).__name__}: {str(err)[:200]}") from None
    where = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(where, dict):
        got = f"its weight_map is {type(where).__name__}" if isinstance(data, dict) else f"got {type(data).__name__}"
        raise ValueError(f"{index}: {what}; {got}")
    bad = next(((k, v) for k, v in where.items() if not _plain_file_name(v)), None)
    if bad is not None:
        raise ValueError(
            f"{index}: weight_map[{bad[0]!r}] is {bad[1]!r:.80}, not the name of a file in the folder (no path, no "
            "'..'); the index is damaged or not this folder's: write it again"
        )
    return where


class Checkpoint:
    """The tensors of a safetensors file or of a folder of shards, read one at a time.

    A missing shard (listed in the index but not in the folder) is a ``ValueError`` naming it, raised
    when the checkpoint is opened, before anything is read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.fspath(path))
        if self.path.is_file():
            files = {self.path.name: self.path}
            where: dict[str, str] = {}
        elif self.path.is_dir():
            index = self.path / INDEX
            if index.is_file():
                where = read_index(self.path)
                names = sorted(set(where.values()))
                missing = [n for n in names if not (self.path / n).is_file()]
                if missing:
                    raise ValueError(
                        f"checkpoint {str(self.path)!r}: shard(s) {', '.join(map(repr, missing))} listed in {INDEX} "
                        f"are missing from the folder ({len(names) - len(missing)} of {len(names)} present); copy "
                        "the whole checkpoint"
                    )
                files = {n: self.path / n for n in names}
            else:
                files = {p.name: p for p in sorted(self.path.glob("*.safetensors"))}
                where = {}
                if not files:
                    raise ValueError(f"checkpoint folder {str(self.path)!r} holds no *.safetensors file and no {INDEX}")
        else:
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} does not exist (working directory: {os.getcwd()})")
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name, file in files.items():
            header, start = _header(file)
            for key, entry in header.items():
                if where and where.get(key, name) != name:
                    continue  # the index says another shard holds it
                self.entries[key] = (file, entry, start)
        unlisted = [k for k in where if k not in self.entries]
        if unlisted:
            raise ValueError(
                f"checkpoint {str(self.path)!r}: {INDEX} lists {unlisted[0]!r} in {where[unlisted[0]]!r}, "
                "which does not hold it; the index and the shards disagree"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of tensor ``name`` (None for one torch cannot hold)."""
        return _DTYPES.get(self.entries[name][1].get("dtype", ""))

    def copy_to(self, names: list[str], path: Path) -> int:
        """Write tensors ``names`` as they are stored into a new safetensors file at ``path``; its size in bytes.

        The bytes go from file to file a chunk at a time: no tensor is ever whole in memory.
        """
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            _, entry, _ = self.entries[name]
            begin, end = entry["data_offsets"]
            header[name] = {
                "dtype": entry["dtype"],
                "shape": entry["shape"],
                "data_offsets": [offset, offset + end - begin],
            }
            offset += end - begin
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                file, entry, start = self.entries[name]
                begin, end = entry["data_offsets"]
                with file.open("rb") as f:
                    f.seek(start + begin)
                    left = end - begin
                    while left:
                        chunk = f.read(min(left, 16 << 20))
                        if not chunk:
                            raise ValueError(
                                f"checkpoint {str(file)!r} is truncated: tensor {name!r} ends past its end"
                            )
                        out.write(chunk)
                        left -= len(chunk)
        return 8 + len(raw) + offset

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` read from disk (cast to ``dtype`` when given)."""
        file, entry, start = self.entries[name]
        stored = _DTYPES.get(entry.get("dtype", ""))
        if stored is None:
            raise ValueError(
                f"checkpoint {str(file)!r}: tensor {name!r} has dtype {entry.get('dtype')!r}, which "
                f"fx_sparsify cannot read (known: {', '.join(_DTYPES)})"
            )
        begin, end = entry["data_offsets"]
        out = torch.empty(tuple(entry["shape"]), dtype=stored)
        raw = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
        if raw.numel() != end - begin:
            raise ValueError(
                f"checkpoint {str(file)!r}: tensor {name!r} takes {end - begin} bytes, its shape and "
                f"dtype need {raw.numel()}; the file is damaged"
            )
        with file.open("rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(raw.numpy())) != raw.numel():  # type: ignore[arg-type]
                raise ValueError(f"checkpoint {str(file)!r} is truncated: tensor {name!r} ends past its end")
        return out if dtype is None or dtype == stored else out.to(dtype)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved onto the meta device (no memory)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _owners(
    root: nn.Module, modules: Iterable[str], recurse: bool, buffers: bool = False
) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, FQN) of each parameter (or persistent buffer) the modules hold (only directly unless
    ``recurse``)."""
    out = []
    for prefix in modules:
        module = root.get_submodule(prefix)
        for name, sub in module.named_modules(prefix=prefix) if recurse else [(prefix, module)]:
            held = sub._buffers if buffers else sub._parameters
            for attr, p in held.items():
                if p is not None and not (buffers and attr in sub._non_persistent_buffers_set):
                    out.append((sub, attr, f"{name}.{attr}" if name else attr))
    return out


def materialise(
    root: nn.Module, modules: Iterable[str], checkpoint: Checkpoint, aliases: dict[str, str], recurse: bool = True
) -> None:
    """Read the meta parameters of ``modules`` (FQNs in ``root``) from ``checkpoint`` onto the CPU, and copy the
    persistent buffers the checkpoint holds into theirs.

    A parameter keeps the dtype the model gave it; tied parameters stay one tensor. ``aliases`` maps
    every parameter FQN to the one FQN of its tensor (:func:`fx_sparsify.select.param_aliases`); a
    tied parameter is read under whichever of its names the checkpoint holds. A parameter the
    checkpoint lacks under all its names is a ``ValueError`` naming it.
    """
    names_of: dict[str, list[str]] = {}
    for fqn, canonical in aliases.items():
        names_of.setdefault(canonical, []).append(fqn)
    loaded: dict[int, nn.Parameter] = {}
    for module, attr, fqn in _owners(root, modules, recurse):
        p = module._parameters[attr]
        assert p is not None
        if p.device.type != "meta":
            continue
        if id(p) not in loaded:
            names = names_of.get(aliases.get(fqn, fqn), [fqn])
            stored = next((n for n in names if n in checkpoint), None)
            if stored is None:
                raise ValueError(
                    f"checkpoint {str(checkpoint.path)!r} holds no tensor {fqn!r}"
                    + (
                        f" (nor its tied names {', '.join(map(repr, [n for n in names if n != fqn]))})"
                        if len(names) > 1
                        else ""
                    )
                    + "; is it the checkpoint of this model?"
                )
            if checkpoint.shape(stored) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint tensor {stored!r} has shape {checkpoint.shape(stored)}, the model's "
                    f"{fqn!r} has {tuple(p.shape)}; build the model with the checkpoint's config"
                )
            loaded[id(p)] = type(p)(checkpoint.read(stored, p.dtype), requires_grad=False)
        module._parameters[attr] = loaded[id(p)]
    for module, attr, fqn in _owners(root, modules, recurse, buffers=True):  # persistent buffers the file holds
        buf = module._buffers[attr]
        if fqn in checkpoint and buf is not None and checkpoint.shape(fqn) == tuple(buf.shape):
            buf.copy_(checkpoint.read(fqn, buf.dtype))


def release(root: nn.Module, modules: Iterable[str], recurse: bool = True) -> None:
    """Put the parameters of ``modules`` back onto the meta device (their memory is freed)."""
    moved: dict[int, nn.Parameter] = {}
    for module, attr, _ in _owners(root, modules, recurse):
        p = module._parameters[attr]
        assert p is not None
        if p.device.type != "meta":
            if id(p) not in moved:
                moved[id(p)] = type(p)(torch.empty_like(p, device="meta"), requires_grad=False)
            module._parameters[attr] = moved[id(p)]
