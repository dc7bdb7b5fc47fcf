"""A damaged or hostile storage choices file (``fxs.load_storage_choices``) is a ValueError naming the file and
what is wrong: never a bare TypeError / UnicodeDecodeError / RecursionError, never a field coerced into a value it
did not hold, never two storages for one layer with the last one silently winning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

ROW = {"layer": "0", "shape": [64, 64], "sparsity": 0.9, "storage": "csr", "ratio": 0.5, "why": "recorded"}


def _file(tmp_path: Path, layers: Any = None, raw: bytes | None = None) -> Path:
    path = tmp_path / "choices.json"
    content = {"format": "fx_sparsify-storage-choices", "version": 1, "layers": [ROW] if layers is None else layers}
    path.write_bytes(json.dumps(content).encode() if raw is None else raw)
    return path


def test_a_good_file_loads(tmp_path: Path) -> None:
    (choice,) = fxs.load_storage_choices(_file(tmp_path))
    assert (choice.layer, choice.shape, choice.storage, choice.ratio) == ("0", (64, 64), "csr", 0.5)


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\xff\x00\xfe garbage", "not JSON"),
        (b"[" * 100_000, "not JSON: maximum recursion depth"),
        (b'{"layers": [' + b"9" * 5000 + b"]}", "not JSON: Exceeds the limit"),
    ],
)
def test_a_file_that_is_not_json_names_the_file(tmp_path: Path, raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=rf"choices\.json: .*{match}"):
        fxs.load_storage_choices(_file(tmp_path, raw=raw))


@pytest.mark.parametrize(
    "layers,match",
    [
        (5, "'layers' must be a list of layer entries, got int"),
        ({"0": ROW}, "'layers' must be a list of layer entries, got dict"),
        (["0"], "layer entry 0 is malformed: an object, got str"),
        ([{**ROW, "layer": 3}], "'layer' must be a layer name, got 3"),
        ([{**ROW, "shape": [-1, 64]}], "'shape' must be a list of sizes >= 0"),
        ([{**ROW, "shape": [64.7, 64]}], "'shape' must be a list of sizes >= 0"),
        ([{**ROW, "shape": 64}], "'shape' must be a list of sizes >= 0"),
        ([{**ROW, "sparsity": "nan"}], "'sparsity' must be a fraction in \\[0, 1\\]"),
        ([{**ROW, "sparsity": 7}], "'sparsity' must be a fraction in \\[0, 1\\]"),
        ([{**ROW, "storage": ["csr"]}], "'storage' must be a string"),
        ([{**ROW, "ratio": "fast"}], "'ratio' must be a number >= 0 or null"),
        ([{**ROW, "ratio": float("nan")}], "'ratio' must be a number >= 0 or null \\(a time / dense\\), got nan"),
        ([{**ROW, "ratio": -0.5}], "'ratio' must be a number >= 0 or null \\(a time / dense\\), got -0.5"),
        ([ROW, {**ROW, "storage": "dense"}], "layer '0' has two entries \\(0-based 0 and 1\\)"),
    ],
)
def test_a_malformed_entry_names_the_file_and_the_field(tmp_path: Path, layers: Any, match: str) -> None:
    with pytest.raises(ValueError, match=rf"choices\.json: .*{match}"):
        fxs.load_storage_choices(_file(tmp_path, layers))


def test_saved_choices_of_a_squash_load_back_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.9}]}
    sgm = fxs.sparsify_graph(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), spec)
    sgm.step()
    small = sgm.squash(storage="auto-model")  # ratios as modelled (inf where bitmask cannot pay)
    fxs.save_storage_choices(small.storage_choices, tmp_path / "c.json")
    assert fxs.load_storage_choices(tmp_path / "c.json") == small.storage_choices
