"""Recipe files: ``fxs.load_spec`` for JSON, TOML and YAML (SPEC §12)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import fx_sparsify as fxs

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"

SPEC = {
    "seed": 3,
    "weights": [
        {"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "fc", "method": "2:4"},
        {"target": "emb", "method": "topk", "density": 0.2, "gradient": "ste"},
    ],
    "global": [{"targets": ["a", "b"], "method": "l1_unstructured", "sparsity": 0.6}],
    "activations": [{"target": "fc", "aggregate": "abs_sum", "reduce": "mean", "mask": "threshold", "threshold": 0.1}],
}

TOML = """\
seed = 3

[[weights]]
target = "type:Conv2d"
method = "l1_unstructured"
sparsity = 0.5

[[weights]]
target = "fc"
method = "2:4"

[[weights]]
target = "emb"
method = "topk"
density = 0.2
gradient = "ste"

[[global]]
targets = ["a", "b"]
method = "l1_unstructured"
sparsity = 0.6

[[activations]]
target = "fc"
aggregate = "abs_sum"
reduce = "mean"
mask = "threshold"
threshold = 0.1
"""

YAML = """\
seed: 3
weights:
  - {target: "type:Conv2d", method: l1_unstructured, sparsity: 0.5}
  - {target: fc, method: "2:4"}
  - {target: emb, method: topk, density: 0.2, gradient: ste}
global:
  - {targets: [a, b], method: l1_unstructured, sparsity: 0.6}
activations:
  - {target: fc, aggregate: abs_sum, reduce: mean, mask: threshold, threshold: 0.1}
"""


@pytest.mark.parametrize(
    "name,text", [("r.json", json.dumps(SPEC, indent=1)), ("r.toml", TOML), ("r.yaml", YAML), ("r.yml", YAML)]
)
def test_every_format_reads_the_same_spec(tmp_path: Path, name: str, text: str) -> None:
    if name.endswith(("yaml", "yml")):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    spec = fxs.load_spec(tmp_path / name)
    assert spec == fxs.SparsitySpec.from_dict(SPEC)


def test_to_dict_written_as_json_reads_back_equal(tmp_path: Path) -> None:
    spec = fxs.SparsitySpec.from_dict(SPEC)
    (tmp_path / "back.json").write_text(json.dumps(spec.to_dict()))
    assert fxs.load_spec(str(tmp_path / "back.json")) == spec


def test_the_example_recipe_loads() -> None:
    spec = fxs.load_spec(RECIPES / "resnet_like.toml")
    assert [r.target for r in spec.weights] == ["type:Conv2d", "stem.0", "fc"]
    assert spec.weights[2].method == "nm" and spec.activations[0].target == "fc"


@pytest.mark.parametrize(
    "name,text,line",
    [
        ("bad.json", '{\n  "weights": [\n    {"target": "fc1", "method": "l1_unstructured",}\n  ]\n}', 3),
        ("bad.toml", "seed = 0\n[[weights]\ntarget = 'fc1'\n", 2),
        ("bad.yaml", "weights:\n  - target: fc1\n   method: x\n", 3),
    ],
)
def test_syntax_errors_name_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    if name.endswith("yaml"):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: line {line}, column \d+: invalid"):
        fxs.load_spec(tmp_path / name)


def test_spec_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("seed = 0\n\n[[weights]]\ntarget = 'fc1'\nmethod = 'l1_unstructured'\nsparsty = 0.5\n")
    with pytest.raises(TypeError, match=r"typo.toml: line 6: .*'sparsty' \(did you mean 'sparsity'\?\)"):
        fxs.load_spec(path)
    path = tmp_path / "unknown.json"
    path.write_text('{"seed": 0,\n "wieghts": []}')
    with pytest.raises(KeyError, match=r"unknown.json: line 2: .*'wieghts'"):
        fxs.load_spec(path)


def test_wrong_file_kinds(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fxs.load_spec(tmp_path / "nope.json")
    (tmp_path / "r.ini").write_text("[x]")
    with pytest.raises(ValueError, match=r"unknown recipe format '.ini'.*\.json, \.toml, \.yaml"):
        fxs.load_spec(tmp_path / "r.ini")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TypeError, match="list.json: a recipe holds a table of spec keys"):
        fxs.load_spec(tmp_path / "list.json")


def test_yaml_without_pyyaml_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r.yaml").write_text(YAML)
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match=r"pip install fx-sparsify\[yaml\]"):
        fxs.load_spec(tmp_path / "r.yaml")
