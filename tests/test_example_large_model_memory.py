"""examples/large_model_memory.py runs (docs/memory.md)."""

from __future__ import annotations

import runpy
from pathlib import Path


def test_large_model_memory_example_runs() -> None:
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "large_model_memory.py"), run_name="__main__")
