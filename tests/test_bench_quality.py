"""benchmarks/bench_quality.py runs end to end (slow: pass --runslow); the full run's numbers are in
docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


def _bench() -> Any:
    """benchmarks/bench_quality.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_quality_benchmark_runs_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    bench.main(
        [
            "--steps",
            "2",
            "--d-model",
            "32",
            "--calib",
            "8",
            "--eval",
            "8",
            "--repeats",
            "1",
            "--cache",
            str(tmp_path / "gpt.pt"),
        ]
    )
    out = capsys.readouterr().out
    for row in (
        "| magnitude | 50 %",
        "| wanda | 2:4",
        "| ours sparsegpt (one pass) | 2:4",
        "| ours sparsegpt, sequential | 50 %",
    ):
        assert row in out
    for setting in ("50 % MLP neurons", "75 % MLP neurons", "1 of 4 heads", "2 of 4 heads"):  # structured section
        rows = [line.split(" | ") for line in out.splitlines() if line.startswith(f"| {setting} |")]
        assert {r[1] for r in rows} >= {
            "FLAP (reference)",
            "FLAP + least-squares refit (reference)",
            "obs + reconstruct",
            "obs + reconstruct, sequential",
            "magnitude",
        }
        assert len({r[4] for r in rows}) == 1  # the same parameters left by every method
        assert all(float(r[7].strip(" |")) <= 1e-4 for r in rows if "reference" not in r[1])  # shrunk == masked
    assert "step() CPU s" in out


@pytest.mark.slow
def test_structured_section_runs_the_head_settings_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    args = ["--steps", "2", "--d-model", "32", "--calib", "8", "--eval", "8", "--repeats", "1"]
    bench.main([*args, "--cache", str(tmp_path / "gpt.pt"), "--section", "structured", "--settings", "heads"])
    out = capsys.readouterr().out
    assert "| 1 of 4 heads | obs + reconstruct, sequential |" in out and "| 2 of 4 heads | magnitude |" in out
    assert "MLP neurons" not in out and "| wanda |" not in out
    timing = [line for line in out.splitlines() if "step() CPU s" in line]
    assert len(timing) == 1 and timing[0].startswith("heads:")
