"""The examples under examples/ (other than the data sparsifier's, in tests/data/) run as tests."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs() -> None:
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")


@pytest.fixture(scope="module")
def gradual() -> dict[str, dict[str, float]]:
    example = _load("gradual_pruning")
    return {mode: example.main(["--quick", "--mode", mode]) for mode in ("graph", "inplace")}


def test_gradual_pruning_reaches_80_percent_and_keeps_accuracy(gradual: dict[str, dict[str, float]]) -> None:
    result = gradual["graph"]
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["dense"] > 0.6  # ten classes: chance is 0.1
    assert result["finetuned"] > result["dense"] - 0.05  # 80 % sparse costs little on this task
    assert result["squashed"] == result["finetuned"]


def test_gradual_pruning_inplace_mode_matches_graph_mode(gradual: dict[str, dict[str, float]]) -> None:
    assert gradual["inplace"] == gradual["graph"]


def test_one_shot_sparsegpt_example_reconstruction_beats_wanda_beats_magnitude() -> None:
    errors = _load("one_shot_sparsegpt").main()
    assert errors["sparsegpt"] < 0.5 * errors["wanda"] < 0.5 * errors["magnitude"]


def test_structured_calibrated_beats_magnitude() -> None:
    """examples/structured_calibrated.py: OBS + reconstruct leaves a smaller output error than magnitude at the
    same size, and a registered importance chooses the channels."""
    result = _load("structured_calibrated").main()
    assert result["obs + reconstruct parameters"] == result["magnitude parameters"] < result["dense parameters"]
    assert result["obs + reconstruct"] < 0.8 * result["magnitude"]
    assert result["last-channels kept up_proj rows"] == 88
