"""Sharded checkpoints and the files prune_streamed reads: a damaged or hostile Hugging Face index (shard names that
are not file names of the folder, a tensor in two shards) and damaged safetensors headers are a ValueError naming the
file and the entry; nothing outside the folder is read, no model is written, no file of someone else's is removed."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._checkpoint import INDEX, Checkpoint
from fx_sparsify._streamed_io import ShardWriter
from fx_sparsify.cli import main


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))


def _sharded(folder: Path) -> dict[str, str]:
    """A sharded compressed checkpoint of a half-pruned model (layer 0 in a, layer 1 in b); its weight map."""
    folder.mkdir()
    model = _model()
    with torch.no_grad():
        model[0].weight[:, :8] = 0
    state = model.state_dict()
    fxs.save_compressed({k: v for k, v in state.items() if k.startswith("0.")}, folder / "a.safetensors")
    fxs.save_compressed({k: v for k, v in state.items() if k.startswith("1.")}, folder / "b.safetensors")
    where = {k: "a.safetensors" if k.startswith("0.") else "b.safetensors" for k in state}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return where


def _load_both_ways(folder: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxs.load_compressed(folder)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fxs.load_compressed(folder, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing written


def test_a_good_sharded_checkpoint_loads(tmp_path: Path) -> None:
    _sharded(tmp_path / "ck")
    assert set(fxs.load_compressed(tmp_path / "ck")) == {"0.weight", "0.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize("shard", [5, None, ["a.safetensors"], "", ".", "..", "sub/a.safetensors"])
def test_a_shard_that_is_not_a_file_name_is_refused(tmp_path: Path, shard: Any) -> None:
    where = _sharded(tmp_path / "ck")
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": {**where, "0.weight": shard}}))
    _load_both_ways(tmp_path / "ck", rf"{INDEX}: weight_map\['0\.weight'\] is .*not the name of a file in the folder")


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_an_index_naming_a_file_outside_its_folder_reads_nothing_there(tmp_path: Path, outside: str) -> None:
    where = _sharded(tmp_path / "ck")
    elsewhere = tmp_path / "elsewhere.safetensors"
    fxs.save_compressed({"0.weight": torch.ones(16, 16)}, elsewhere)
    name = "../elsewhere.safetensors" if outside == "relative" else str(elsewhere)
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": {**where, "0.weight": name}}))
    _load_both_ways(tmp_path / "ck", "not the name of a file in the folder")


@pytest.mark.parametrize("content", [["a.safetensors"], {"weight_map": ["a.safetensors"]}, {"metadata": {}}])
def test_an_index_that_is_not_a_weight_map_is_refused(tmp_path: Path, content: Any) -> None:
    _sharded(tmp_path / "ck")
    (tmp_path / "ck" / INDEX).write_text(json.dumps(content))
    _load_both_ways(tmp_path / "ck", f"{INDEX}: not a Hugging Face index")


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    where = _sharded(tmp_path / "ck")
    fxs.save_compressed({"0.weight": torch.ones(16, 16)}, tmp_path / "ck" / "c.safetensors")
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": {**where, "extra": "c.safetensors"}}))
    _load_both_ways(tmp_path / "ck", "tensor '0.weight' is in both 'a.safetensors' and 'c.safetensors'")


# --- the checkpoint prune_streamed reads -----------------------------------------------------------------


def _safetensors(path: Path, edit: Any = None, length: int | None = None, body: bytes | None = None) -> Path:
    save_file({"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if edit is not None:
        edit(header)
    encoded = json.dumps(header).encode() if body is None else body
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


@pytest.mark.parametrize(
    "edit,length,body,match",
    [
        (lambda h: h["a.weight"].update(shape=16), None, None, "shape must be a list of sizes >= 0"),
        (lambda h: h["a.weight"].update(shape=[-4, -4]), None, None, "shape must be a list of sizes >= 0"),
        (lambda h: h["a.weight"].update(data_offsets=5), None, None, "data_offsets must be two ints"),
        (lambda h: h["a.weight"].update(data_offsets=[-64, 0]), None, None, "data_offsets must be two ints"),
        (lambda h: h["a.weight"].update(shape=[2**20, 2**20]), None, None, r"takes 4398046511104 bytes"),
        (lambda h: h.update({"a.weight": [1, 2]}), None, None, "must be an object with dtype, shape and data_offsets"),
        (None, 2**62, None, "the header says 4611686018427387904 bytes"),
        (None, None, b"[" * 100_000, "its header nests too deep"),
    ],
)
def test_a_damaged_header_of_the_streamed_checkpoint_is_a_value_error(
    tmp_path: Path, edit: Any, length: int | None, body: bytes | None, match: str
) -> None:
    path = _safetensors(tmp_path / "model.safetensors", edit, length, body)
    with pytest.raises(ValueError, match=rf"model\.safetensors: .*{match}"):
        Checkpoint(path)


def test_a_negative_offset_never_reads_the_header_as_a_tensor(tmp_path: Path) -> None:
    """[-64, 0] passed as 64 bytes and read the 64 bytes before the data (the header) as the tensor."""
    path = _safetensors(tmp_path / "model.safetensors", lambda h: h["a.weight"].update(data_offsets=[-64, 0]))
    with pytest.raises(ValueError, match="data_offsets"):
        Checkpoint(path).read("a.weight")


@pytest.mark.parametrize("shard", [5, None, "../x.safetensors"])
def test_the_streamed_checkpoint_refuses_a_hostile_index(tmp_path: Path, shard: Any) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    _safetensors(folder / "model-1.safetensors")
    _safetensors(tmp_path / "x.safetensors")
    (folder / INDEX).write_text(json.dumps({"weight_map": {"a.weight": "model-1.safetensors", "a.bias": shard}}))
    with pytest.raises(ValueError, match=rf"{INDEX}: weight_map\['a\.bias'\] is"):
        Checkpoint(folder)


# --- the folder prune_streamed writes into ---------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [
        ["model-00001-of-00001.safetensors"],
        {"metadata": "fx_sparsify wrote this? no", "weight_map": {"w": "model-00001-of-00001.safetensors"}},
        {"metadata": {"fx_sparsify": {}}, "weight_map": {"w": 5, "v": ["x"]}},
        {"metadata": {"fx_sparsify": {}}, "weight_map": "model-00001-of-00001.safetensors"},
    ],
)
def test_an_output_folder_with_a_foreign_or_damaged_index_is_prepared_without_error(tmp_path: Path, index: Any) -> None:
    """The previous run's listing decides which files are removed: a foreign or damaged one removes none."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "model-00001-of-00001.safetensors"
    theirs.write_bytes(b"someone else's")
    (out / INDEX).write_text(json.dumps(index))
    ShardWriter(out, 2).begin()
    assert theirs.read_bytes() == b"someone else's"


# --- fx-sparsify inspect on a folder -----------------------------------------------------------------------


def test_inspect_reads_a_folder_of_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sharded(tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "| 0.weight" in out and "| 1.bias" in out and "4 tensors" in out


def test_inspect_of_a_folder_says_what_is_wrong_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2  # was "'...' does not exist" for a folder that does
    assert f"is a folder without {INDEX}" in capsys.readouterr().err
    where = _sharded(tmp_path / "ck")
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": {**where, "0.weight": 5}}))
    assert main(["inspect", str(tmp_path / "ck")]) == 2
    assert "weight_map['0.weight'] is 5" in capsys.readouterr().err


# --- fx-sparsify run --checkpoint --------------------------------------------------------------------------


def test_run_with_a_checkpoint_of_another_shape_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shapes are compared before anything is read (load_state_dict raised a RuntimeError: exit 1, a
    traceback); nothing is written."""
    factory = tmp_path / "factory.py"
    factory.write_text(
        "from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))\n"
    )
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps({"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]})
    )
    weights = {"0.weight": torch.randn(32, 16), "0.bias": torch.randn(32), "2.weight": torch.randn(8, 33)}
    save_file({**weights, "2.bias": torch.randn(8)}, str(tmp_path / "ckpt.safetensors"))
    args = [str(recipe), "--model", f"{factory}:mlp", "--input", "2x16", "--quiet", "--out", str(tmp_path / "out")]
    assert main(["run", *args, "--checkpoint", str(tmp_path / "ckpt.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds 1 tensor(s) of another shape, e.g. 2.weight [8, 33] (the model's [8, 32])" in err
    assert not (tmp_path / "out").exists()
