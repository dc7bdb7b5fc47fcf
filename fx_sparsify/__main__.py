"""``python -m fx_sparsify``: the command line (see :mod:`fx_sparsify.cli`)."""

from __future__ import annotations

from .cli import entry_point

if __name__ == "__main__":
    entry_point()
