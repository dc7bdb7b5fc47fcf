"""The recipe / pictures / round-trip examples (snippets of docs/recipes.md and docs/roundtrips.md) run as tests."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_roundtrips_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "roundtrips.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "(adopted)" in out and "'0.weight': '50% zeros'" in out


def test_pictures_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("pydot")
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed")
    monkeypatch.setattr(sys, "argv", ["pictures.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "pictures.py"), run_name="__main__")
    for name in ("graph.svg", "layer1.svg", "sparsity.png", "fc.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert "layer2" not in (tmp_path / "layer1.svg").read_text()
