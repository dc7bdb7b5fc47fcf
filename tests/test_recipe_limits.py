"""Hostile recipes: YAML alias bombs, nesting thousands deep and huge integers are short ValueErrors naming the
file and line, fast, and ``fx-sparsify run`` exits 2 on them without a traceback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import fx_sparsify as fxs
from fx_sparsify.cli import main as cli_main

BOMB = """\
seed: 0
weights:
  - target: fc1
    method: l1_unstructured
    sparsity:
      - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
      - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
      - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
      - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
      - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
      - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
      - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
      - &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
      - [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _cli(recipe: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = cli_main(
        [
            "run",
            str(recipe),
            "--model",
            "torch.nn:Identity",
            "--input",
            "2",
            "--out",
            str(recipe.parent / "out"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 600
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"bomb.yaml: line 11: its aliases expand to more than \d+ values") as info:
        fxs.load_spec(path)
    assert len(str(info.value)) < 400
    assert "bomb.yaml" in _cli(path, capsys)
    assert time.monotonic() - start < 20  # it hung (the error message repr()s the expanded value)


def test_aliases_that_stay_small_still_load(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "ok.yaml"
    path.write_text(
        "weights:\n  - &r {target: fc1, method: l1_unstructured, sparsity: 0.5}\n  - {<<: *r, target: fc2}\n"
    )
    spec = fxs.load_spec(path)
    assert [r.target for r in spec.weights] == ["fc1", "fc2"]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_recipes_nested_thousands_deep(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    deep = "[" * 5000 + "]" * 5000
    text = {
        ".json": '{"seed": 0,\n "weights": ' + deep + "}",
        ".yaml": "seed: 0\nweights: " + deep + "\n",
        ".toml": "seed = 0\nweights = " + deep + "\n",
    }[suffix]
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"deep{suffix}: line 2: .*nests deeper than \d+ levels") as info:
        fxs.load_spec(path)
    assert len(str(info.value)) < 400
    assert f"deep{suffix}" in _cli(path, capsys)


def test_moderate_nesting_past_the_bound_is_refused_at_its_line(tmp_path: Path) -> None:
    """Deep enough for the bound, shallow enough for the parser: the check on the parsed data names the line."""
    path = tmp_path / "nested.json"
    path.write_text('{"seed": 0,\n"weights": [{"target": "fc1",\n "x": ' + "[" * 200 + "]" * 200 + "}]}")
    with pytest.raises(ValueError, match=r"nested.json: line 3: .*nests deeper than \d+ levels"):
        fxs.load_spec(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_a_huge_integer_names_the_file_and_line(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    digits = "9" * 5000
    text = {
        ".json": json.dumps({"seed": 0})[:-1] + ',\n"weights": [{"target": "fc1", "sparsity": ' + digits + "}]}",
        ".yaml": "seed: 0\nweights:\n  - {target: fc1, sparsity: " + digits + "}\n",
        ".toml": "seed = 0\n[[weights]]\ntarget = 'fc1'\nsparsity = " + digits + "\n",
    }[suffix]
    path = tmp_path / f"big{suffix}"
    path.write_text(text)
    line = {".json": 2, ".yaml": 3, ".toml": 4}[suffix]
    with pytest.raises(ValueError, match=rf"big{suffix}: line {line}\b.*integer with 5000 digits") as info:
        fxs.load_spec(path)
    assert len(str(info.value)) < 400
    assert f"big{suffix}" in _cli(path, capsys)
