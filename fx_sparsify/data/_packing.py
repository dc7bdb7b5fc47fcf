"""Bit-packing of boolean masks: 1 bit per entry in ``state_dict`` and pickles (8x smaller than bool)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["pack_mask", "unpack_mask"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """A ``uint8`` tensor holding ``mask``'s bits, little-endian within each byte (flat, row-major)."""
    flat = mask.detach().reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(torch.uint8).view(-1, 8)
    out = bits[:, 0].clone()
    for i in range(1, 8):
        out.bitwise_or_(bits[:, i] << i)
    return out.cpu()


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_mask`: a ``bool`` tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise ValueError(
            f"a packed mask for shape {tuple(shape)} is a 1-D uint8 tensor of {-(-numel // 8)} bytes; "
            f"got dtype {packed.dtype} and shape {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)).bitwise_and_(1).view(torch.bool)
    return bits.reshape(-1)[:numel].reshape(tuple(int(s) for s in shape)).clone()
