"""examples/bitmask_storage.py runs (the snippet of docs/bitmask.md): the outputs it checks are equal, the
saved choices give the same layouts again, the checkpoint loads into bitmask layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bitmask_storage.py"


def test_bitmask_storage_example(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bitmask_storage", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--width", "128", "--out", str(tmp_path)])
    assert result["again"] == result["choices"]  # reused from choices.json, no timing
    assert result["loaded"] == ["BitmaskLinear", "ReLU", "BitmaskLinear"]
    assert (tmp_path / "choices.json").is_file() and (tmp_path / "model.safetensors").is_file()
