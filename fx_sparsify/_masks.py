"""Mask storage and in-place masking in bounded memory (SPEC §15).

Weight masks are ``torch.bool`` buffers: one byte per entry, a quarter of an fp32 weight (half of a
bf16 one). A mask buffer of another dtype (a float 0/1 mask from an older checkpoint or pickle) is
read as ``mask != 0``. In-place masking works over chunks of :data:`CHUNK` elements, so its
temporaries stay a small, fixed size whatever the tensor's size.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from ._native import libc_function
from ._threads import serial_when_small

__all__ = [
    "CHUNK",
    "PACK_MIN",
    "keep_of",
    "zero_pruned_",
    "masked_copy",
    "is_masked",
    "PendingMask",
    "PackedMask",
    "pending",
    "release_freed_memory",
]

#: elements per chunk of the mask ops (1 Mi: bool temporaries of 1 MiB). Larger chunks mean fewer ops, and each
#: op wakes the intra-op threads: on a busy machine a step of many small ops with 2 threads took 8x one thread's
CHUNK = 1 << 20


def keep_of(mask: Tensor) -> Tensor:
    """``mask`` as a bool keep-mask: the tensor itself when it is bool, else ``mask != 0``."""
    return mask if mask.dtype == torch.bool else mask != 0


def _flat_pairs(weight: Tensor, mask: Tensor, chunk: int) -> list[tuple[Tensor, Tensor]] | None:
    """Matching flat chunks of ``weight`` and ``mask``, or None when they cannot be viewed flat."""
    if weight.shape != mask.shape or not (weight.is_contiguous() and mask.is_contiguous()):
        return None
    return list(zip(weight.view(-1).split(chunk), mask.view(-1).split(chunk)))


@torch.no_grad()
@serial_when_small
def zero_pruned_(weight: Tensor, mask: Tensor, chunk: int = CHUNK) -> Tensor:
    """Write +0.0 into ``weight`` wherever ``mask`` prunes, in place; returns ``weight``.

    Pruned entries become +0.0 (never -0.0, whatever the weight's sign) and NaN / inf weights are
    zeroed too. Temporaries are one bool chunk; a mask that broadcasts or a non-contiguous weight is
    masked in one go.
    """
    pairs = _flat_pairs(weight, mask, chunk)
    if pairs is None:
        weight.masked_fill_(keep_of(mask).logical_not(), 0)
        return weight
    for w, m in pairs:
        w.masked_fill_(keep_of(m).logical_not(), 0)
    return weight


@torch.no_grad()
@serial_when_small
def masked_copy(weight: Tensor, mask: Tensor, chunk: int = CHUNK) -> Tensor:
    """A new tensor holding ``weight`` with +0.0 where ``mask`` prunes (``weight`` is unchanged)."""
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    pairs = _flat_pairs(out, mask, chunk) if weight.is_contiguous() else None
    if pairs is None:
        out.copy_(weight)
        return zero_pruned_(out, mask, chunk)
    for (o, m), w in zip(pairs, weight.view(-1).split(chunk)):
        torch.where(keep_of(m), w, w.new_zeros(()), out=o)
    return out


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@torch.no_grad()
@serial_when_small
def is_masked(weight: Tensor, mask: Tensor, chunk: int = CHUNK) -> bool:
    """True when every entry ``mask`` prunes is already +0.0 in ``weight`` (nothing to fold).

    Compares the entries' bits (so -0.0 and NaN count as not masked) a chunk at a time, and stops at
    the first chunk with a pruned entry that is not +0.0: an unmasked weight costs one small chunk.
    """
    pairs = _flat_pairs(weight, mask, chunk)
    if pairs is None:
        pairs = [(weight, mask)]
    bits = _BITS[weight.element_size()]
    for w, m in pairs:
        if bool(torch.gt(w.view(bits) != 0, keep_of(m)).any()):  # a set bit where the mask prunes
            return False
    return True


_SHIFTS = torch.arange(8, dtype=torch.uint8)
_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # bit i of a packed byte: entry i
#: masks with fewer entries stay bool while pending (packing saves nothing worth its time)
PACK_MIN = 1 << 16
#: packing and unpacking work on chunks this many times :data:`CHUNK` (a uint8 temporary of that many bytes)
PACK_CHUNKS = 1


class PendingMask:
    """A keep-mask that ``step()`` holds, in some compact form, until it writes every new mask (all or nothing)."""

    shape: tuple[int, ...]

    @serial_when_small
    def unpack_into(self, buf: Tensor) -> None:
        """Write the mask into ``buf`` (its shape; bool, or 0/1 of another dtype) in place."""
        if buf.is_contiguous():
            self.unpack_flat(buf.view(-1))
            return
        whole = torch.empty(self.shape, dtype=torch.bool, device=buf.device)
        self.unpack_flat(whole.view(-1))
        buf.copy_(whole)

    def unpack_flat(self, flat: Tensor) -> None:
        """Write the mask into the contiguous 1-D ``flat`` (its entries in row-major order) in place."""
        raise NotImplementedError

    def packed(self) -> PackedMask:
        """The mask at 1 bit per entry, reading nothing else."""
        raise NotImplementedError

    def reads(self) -> Tensor | None:
        """The tensor the mask is computed from when it is written (None: the mask holds its own bits); it must
        not change until then."""
        return None

    def stale(self) -> bool:
        """Whether the tensor it :meth:`reads` was written in place since the mask was ranked."""
        return False


class PackedMask(PendingMask):
    """A keep-mask held at 1 bit per entry until it is written into its buffer.

    ``step()`` is all or nothing, so it holds every new mask until all are computed: packed, they cost
    1/32 of an fp32 weight instead of 1/4. Packing and :meth:`unpack_into` work a chunk at a time.
    """

    @serial_when_small
    def __init__(self, mask: Tensor, chunk: int = CHUNK * PACK_CHUNKS) -> None:
        self.shape = tuple(mask.shape)
        self.chunk = chunk - chunk % 8 or 8
        flat = keep_of(mask).reshape(-1)
        weights = _WEIGHTS.to(flat.device)
        self.data = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=flat.device)
        for start in range(0, flat.numel(), self.chunk):  # two ops a chunk: bit i times 2**i, summed per byte
            c = flat[start : start + self.chunk]
            if c.numel() % 8:
                c = torch.cat([c, c.new_zeros((-c.numel()) % 8)])
            bits = c.contiguous().view(torch.uint8).view(-1, 8)
            torch.sum(bits * weights, dim=1, dtype=torch.uint8, out=self.data[start // 8 : start // 8 + bits.shape[0]])

    @classmethod
    def packing(cls, shape: tuple[int, ...], device: torch.device, chunk: int = CHUNK * PACK_CHUNKS) -> PackedMask:
        """An all-pruned mask of ``shape`` that :meth:`pack` fills chunk by chunk: a selector that makes its keep
        mask a chunk at a time never holds a bool mask of the whole tensor."""
        self = cls.__new__(cls)
        self.shape, self.chunk = tuple(shape), chunk - chunk % 8 or 8
        self.data = torch.zeros((math.prod(shape) + 7) // 8, dtype=torch.uint8, device=device)
        return self

    def pack(self, start: int, keep: Tensor) -> None:
        """Write the flat entries ``[start, start + keep.numel())`` from the 1-D bool ``keep`` (``start`` a
        multiple of 8)."""
        assert start % 8 == 0, start
        if keep.numel() % 8:
            keep = torch.cat([keep, keep.new_zeros((-keep.numel()) % 8)])
        bits = keep.contiguous().view(torch.uint8).view(-1, 8)
        weights = _WEIGHTS.to(bits.device)
        torch.sum(bits * weights, dim=1, dtype=torch.uint8, out=self.data[start // 8 : start // 8 + bits.shape[0]])

    def packed(self) -> PackedMask:
        return self

    def unpack_flat(self, flat: Tensor) -> None:
        shifts = _SHIFTS.to(self.data.device)
        for start in range(0, flat.numel(), self.chunk):
            part = flat[start : start + self.chunk]
            packed = self.data[start // 8 : (start + part.numel() + 7) // 8]
            bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1).view(torch.bool).reshape(-1)[: part.numel()]
            part.copy_(bits)


def pending(mask: Tensor | PendingMask) -> Tensor | PendingMask:
    """``mask`` as update_masks holds it until the step writes: packed when large (see :class:`PackedMask`)."""
    if isinstance(mask, PendingMask):  # a selector that makes its mask compact (methods.PACKED_METHODS)
        return mask
    return PackedMask(mask) if mask.numel() >= PACK_MIN and mask.is_contiguous() else mask


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from a heap that it
    rarely shrinks, so the chunk-sized temporaries of a step would otherwise stay in the process's
    resident memory after the step. Costs microseconds.
    """
    trim = libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is not None:
        trim(0)
