"""examples/shrink_resnet.py runs: channels rule → step → shrink_plan → squash(shrink=True) → latency."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shrink_resnet.py"


def test_shrink_resnet_example_runs_and_shrinks(capsys) -> None:  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("shrink_resnet", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    out = capsys.readouterr().out
    assert "fx_sparsify shrink plan" in out and "latency (batch 1, 1 thread(s))" in out
    assert result["small_params"] < 0.35 * result["dense_params"]  # half the channels: about a quarter of the weights
