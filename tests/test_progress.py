"""Progress of long work on stderr (fx_sparsify/_progress.py): step() shows one line per solved SparseGPT layer
(a tqdm bar where tqdm is installed), nothing with verbose=False."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._progress import progress


@pytest.fixture
def no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain-line display


def test_plain_lines_without_tqdm(no_tqdm: None, capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress(2, "work", unit="layer")
    bar.update(1, "fc1")
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err == "work: 1/2 fc1\nwork: 2/2\n"
    quiet = progress(2, "work", enabled=False)
    quiet.update(1, "fc1")
    quiet.close()
    assert capsys.readouterr().err == ""


def test_a_tqdm_bar_where_installed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    bar = progress(3, "work", unit="layer")
    bar.update(1, "fc1")
    bar.close()
    err = capsys.readouterr().err
    assert "work" in err and "1/3" in err and "fc1" in err


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("sequential", [False, True])
def test_step_with_sparsegpt_shows_each_layer(
    no_tqdm: None, sequential: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"weights": [{"target": "type:Linear", "method": "sparsegpt", "sparsity": 0.5, "sequential": sequential}]}
    x = torch.randn(64, 16)
    sgm = fxs.sparsify_graph(_mlp(), spec, example_inputs=(x,))
    with torch.no_grad():
        sgm(x)
    capsys.readouterr()
    sgm.step()
    assert capsys.readouterr().err.splitlines() == ["step: sparsegpt: 1/2 0.weight", "step: sparsegpt: 2/2 2.weight"]
    with torch.no_grad():
        sgm(x)
    sgm.step(verbose=False)
    assert capsys.readouterr().err == ""


def test_a_step_without_solves_shows_nothing(no_tqdm: None, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(_mlp(), spec, example_inputs=(torch.randn(2, 16),))
    sgm.step()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("sequential", [False, True])
def test_step_with_channel_reconstruction_shows_the_refits(
    no_tqdm: None, sequential: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``reconstruct`` channels rule refits each group's consumers: one line per refit group."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    rule = {"sparsity": 0.5, "importance": "obs", "reconstruct": True, "sequential": sequential, "round_to": 1}
    spec = {"channels": [{"target": "0", **rule}, {"target": "2", **rule}]}
    x = torch.randn(64, 16)
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    with torch.no_grad():
        sgm(x)
    capsys.readouterr()
    sgm.step()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "step: reconstruct: 2/2 channels"
    with torch.no_grad():
        sgm(x)
    sgm.step(verbose=False)
    assert capsys.readouterr().err == ""
