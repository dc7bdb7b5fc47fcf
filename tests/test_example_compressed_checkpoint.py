"""examples/compressed_checkpoint.py runs (the snippet of docs/storage.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compressed_checkpoint.py"


def test_compressed_checkpoint_example(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compressed_checkpoint", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--width", "512", "--sparsity", "0.9", "--batch-size", "4", "--out", str(tmp_path)])
    assert result["file_ratio"] <= 0.135  # 90 % zeros: values + one bit per entry, header and biases included
    assert result["layers"] == 2
    assert (tmp_path / "model.safetensors").is_file()
