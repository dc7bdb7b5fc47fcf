"""The files and memory of streamed pruning (:mod:`fx_sparsify.streamed`): the calibration activations that
flow from block to block (in memory, or spilled to files past a budget), the output folder's shards and index,
and the tensors outside the repeated blocks.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ._checkpoint import INDEX, Checkpoint
from ._compressed import save_compressed
from ._modules import attach
from ._native import libc_function
from .methods import generator_for, get_mask_method
from .select import resolve_weight_targets
from .spec import GlobalRule, SparsitySpec, WeightRule

__all__ = [
    "Activations",
    "ShardWriter",
    "MARKER",
    "needs_calibration",
    "first_tensor",
    "outside_groups",
    "prune_outside",
    "state_outside",
    "mmap_large_allocations",
]

#: lists the shards a run into ``out`` has written until its index is written (then removed)
MARKER = ".fx_sparsify-stream.json"
#: weight methods whose step reads calibration statistics
CALIBRATED_METHODS = ("sparsegpt",)


def needs_calibration(spec: SparsitySpec) -> bool:
    """Whether a rule of ``spec`` reads calibration statistics (SparseGPT, Wanda, activations, channel importance)."""
    rules: list[WeightRule | GlobalRule] = [*spec.weights, *spec.global_]
    return (
        bool(spec.activations)
        or any(r.method in CALIBRATED_METHODS or getattr(r, "scores", None) == "wanda" for r in rules)
        or any(getattr(r, "importance", "magnitude") != "magnitude" for r in spec.channels)
    )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation over ``threshold`` bytes from its own mapping, unmapped when freed.

    glibc's default threshold starts at 128 KiB and rises to the size of each large block it frees (up
    to 32 MiB); after the first block's weights are freed, the next blocks' weights, Hessians and solve
    copies come from the heap, whose freed chunks stay resident and fragment it: the peak of a streamed run
    varied from run to run by a third. Fixed, each such tensor leaves the process as soon as it is freed.
    Process-wide and kept after the call (glibc cannot go back to its moving threshold), so only
    ``fx-sparsify run --stream`` sets it, in a process that exists for the prune: ``prune_streamed`` called
    from the user's own process leaves the allocator as it is (every allocation of 1-32 MiB made later would
    map and fault in fresh pages). Returns whether it was set (glibc only).
    """
    mallopt = libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


# --- calibration activations -----------------------------------------------------------------------------
class Activations:
    """Each local batch's input to the current block: the stream tensor (in memory or on disk) + its context."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit, self.held = folder, limit, 0
        self.streams: list[Tensor | Path] = []
        self.contexts: list[tuple[tuple[Any, ...], dict[str, Any], int | str]] = []

    def add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        slot: int | str = (
            0
            if args
            else (
                "hidden_states"
                if "hidden_states" in kwargs
                else next((k for k, v in kwargs.items() if isinstance(v, Tensor)), "")
            )
        )
        stream = args[0] if args else kwargs.get(slot)  # type: ignore[arg-type]
        if not isinstance(stream, Tensor):
            raise ValueError("prune_streamed: the first block receives no tensor input to stream from block to block")
        args = tuple(None if i == 0 else _detach(a) for i, a in enumerate(args))
        kwargs = {k: None if k == slot else _detach(v) for k, v in kwargs.items()}
        self.contexts.append((args, kwargs, slot))
        self.streams.append(torch.empty(0))
        self.put(len(self.streams) - 1, stream)

    def __len__(self) -> int:
        return len(self.streams)

    def put(self, j: int, t: Tensor) -> None:
        old = self.streams[j]
        if isinstance(old, Tensor):
            self.held -= old.nbytes
        t = t.detach().contiguous()
        if self.held + t.nbytes <= self.limit:
            self.streams[j] = t
            self.held += t.nbytes
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{j:06d}.pt"
        torch.save(t, self.folder / f"{j:06d}.tmp")
        os.replace(self.folder / f"{j:06d}.tmp", path)
        self.streams[j] = path

    def inputs(self, j: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        stream = self.streams[j]
        if not isinstance(stream, Tensor):
            stream = torch.load(stream, weights_only=True)
        args, kwargs, slot = self.contexts[j]
        if isinstance(slot, int):
            return (stream, *args[1:]), dict(kwargs)
        return tuple(args), {**kwargs, slot: stream}

    def spilled(self) -> int:
        return sum(not isinstance(s, Tensor) for s in self.streams)


def _detach(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    return v


def first_tensor(out: Any) -> Tensor:
    """The tensor a block hands to the next one: its output, or the first entry of a tuple / list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(
        f"prune_streamed: a block returned {type(out).__name__}; a block must return a tensor or a "
        "tuple whose first entry is the tensor the next block reads"
    )


# --- the output folder -----------------------------------------------------------------------------------
class ShardWriter:
    """Shards and index in ``out``; removes what an earlier, unfinished run into it left."""

    def __init__(self, out: Path, count: int) -> None:
        self.out, self.count = out, count
        self.weight_map: dict[str, str] = {}
        self.written: list[str] = []
        self.total = 0

    def name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.count:05d}.safetensors"

    def begin(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for listing in (self.out / MARKER, self.out / INDEX):
            if not listing.is_file():
                continue
            try:
                data = json.loads(listing.read_bytes())
            except (OSError, ValueError, RecursionError):  # not JSON (ValueError: JSON or UTF-8 decoding)
                continue
            if not isinstance(data, dict):
                continue  # not a listing of ours (nor of anything): left alone
            metadata = data.get("metadata")
            ours = listing.name == MARKER or (isinstance(metadata, dict) and "fx_sparsify" in metadata)
            files = data.get("files") if listing.name == MARKER else data.get("weight_map")
            files = files.values() if isinstance(files, dict) else files if isinstance(files, list) else []
            if ours:
                for f in set(f for f in files if isinstance(f, str)):
                    if "/" not in f and "\\" not in f and f.startswith("model-"):
                        (self.out / f).unlink(missing_ok=True)
                listing.unlink()
        self._mark()

    def _mark(self) -> None:
        tmp = self.out / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"files": [self.name(i) for i in range(self.count)]}))
        os.replace(tmp, self.out / MARKER)

    def write(self, i: int, state: Mapping[str, Any]) -> None:
        name = self.name(i)
        tmp = self.out / f".{name}.tmp"
        save_compressed(state, tmp)
        os.replace(tmp, self.out / name)
        self.written.append(name)
        self.total += (self.out / name).stat().st_size
        self.weight_map.update({k: name for k in state})

    def copy(self, i: int, checkpoint: Checkpoint, keys: list[str]) -> None:
        """Shard ``i`` holds ``keys`` as the checkpoint stores them (copied a chunk at a time)."""
        name = self.name(i)
        tmp = self.out / f".{name}.tmp"
        self.total += checkpoint.copy_to(keys, tmp)
        os.replace(tmp, self.out / name)
        self.written.append(name)
        self.weight_map.update({k: name for k in keys})

    def finish(self, extra: dict[str, Any]) -> None:
        index = {
            "metadata": {"total_size": self.total, "format": "sparse-bitmask", "fx_sparsify": extra},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        tmp = self.out / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out / INDEX)
        (self.out / MARKER).unlink(missing_ok=True)

    def abandon(self) -> None:
        for name in self.written:
            (self.out / name).unlink(missing_ok=True)
        (self.out / MARKER).unlink(missing_ok=True)


# --- tensors outside the blocks --------------------------------------------------------------------------
def outside_groups(model: nn.Module, blocks: list[str], budget: int) -> list[list[str]]:
    """Modules outside the blocks that hold parameters, in groups of about ``budget`` bytes; tied modules together."""
    inside = tuple(b + "." for b in blocks)
    owners: dict[int, list[str]] = {}
    order: list[str] = []
    for name, module in model.named_modules():
        if name in blocks or name.startswith(inside):
            continue
        own = [p for p in module._parameters.values() if p is not None]
        if own or set(module._buffers) - module._non_persistent_buffers_set:
            order.append(name)
            for p in own:
                owners.setdefault(id(p), []).append(name)
    link = {n: n for n in order}

    def root(n: str) -> str:
        while link[n] != n:
            n = link[n]
        return n

    for names in owners.values():
        for other in names[1:]:
            link[root(other)] = root(names[0])
    clusters: dict[str, list[str]] = {}
    for n in order:
        clusters.setdefault(root(n), []).append(n)
    groups: list[list[str]] = []
    size = 0
    for members in clusters.values():
        nbytes = sum(
            p.numel() * p.element_size()
            for m in members
            for p in model.get_submodule(m)._parameters.values()
            if p is not None
        )
        if not groups or size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].extend(members)
        size += nbytes
    return groups


def prune_outside(model: nn.Module, members: list[str], spec: SparsitySpec | None) -> dict[str, float]:
    """Mask the selected tensors of ``members`` in place (rules needing no calibration); their sparsity."""
    if spec is None:
        return {}
    if needs_calibration(spec) or spec.channels:
        raise ValueError(
            f"prune_streamed: rules select {', '.join(members)} outside the repeated blocks with a method "
            "that needs calibration or channel groups; streamed pruning calibrates the blocks only: make "
            "them 'dense' or use a method that ranks the weight alone (l1_unstructured, nm, ...)"
        )
    shell = nn.Module()
    for m in members:
        attach(shell, m, model.get_submodule(m))
    out = {}
    for name, target in resolve_weight_targets(spec, shell).items():
        rule = target.rule
        if getattr(rule, "scores", None) is not None or getattr(rule, "schedule", None) is not None:
            raise ValueError(
                f"prune_streamed: {name!r} lies outside the repeated blocks, where rules with 'scores' or "
                "'schedule' are not supported; make it 'dense' or drop the option"
            )
        weight = shell.get_parameter(name)
        method = get_mask_method(rule.method)
        method.check_shape(tuple(weight.shape), dict(rule.options), f"target {name!r}")
        keep = method(weight.detach(), generator=generator_for(spec.seed, name), **rule.options)
        with torch.no_grad():
            weight.masked_fill_(~keep.bool(), 0.0)
        out[name] = 1.0 - float(keep.float().mean())
    return out


def state_outside(model: nn.Module, members: list[str]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for m in members:
        module = model.get_submodule(m)
        prefix = f"{m}." if m else ""
        for k, v in module.state_dict(keep_vars=False).items():
            if "." not in k:  # its own tensors only: submodules are other members or blocks
                state[prefix + k] = v
    return state
