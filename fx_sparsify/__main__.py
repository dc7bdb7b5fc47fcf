"""``python -m fx_sparsify``: the command line (see :mod:`fx_sparsify.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
