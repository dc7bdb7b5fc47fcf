"""Reproducible randomness: one generator per (seed, target name), independent of visiting order."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["generator_for"]


def generator_for(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from ``seed`` and ``name`` with a stable hash (same on every process)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen
