"""Command-line JSON that parses badly in Python's own limits is a one-line usage error (exit 2) naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fx_sparsify.cli import main


def _args(tmp_path: Path) -> list[str]:
    """``fx-sparsify run``'s recipe and ``--model`` (an MLP factory taking any keyword) in ``tmp_path``."""
    factory = tmp_path / "factory.py"
    factory.write_text("from torch import nn\n\ndef mlp(**kwargs):\n    return nn.Sequential(nn.Linear(16, 8))\n")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps({"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]})
    )
    return [str(recipe), "--model", f"{factory}:mlp", "--quiet", "--out", str(tmp_path / "out")]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ('{"a": ' + "9" * 5000 + "}", "--model-kwargs: not usable JSON (Exceeds the limit"),
        ('{"a":' * 5000 + "1" + "}" * 5000, "--model-kwargs: not usable JSON (maximum recursion depth"),
    ],
)
def test_model_kwargs_past_pythons_json_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kwargs: str, match: str
) -> None:
    assert main(["run", *_args(tmp_path), "--input", "2x16", "--model-kwargs", kwargs]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.splitlines()) <= 3


@pytest.mark.parametrize("shape", ["2x99999999999", "99999999999999999999x16"])
def test_an_input_shape_too_large_to_allocate_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    """Was torch's allocation error (exit 1, a traceback) or a TypeError with a C++ stack."""
    assert main(["run", *_args(tmp_path), "--input", shape]) == 2
    err = capsys.readouterr().err
    assert f"--input '{shape}': a random batch of" in err and "an example batch takes at most" in err
