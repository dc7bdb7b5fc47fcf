"""Pictures (SPEC §13): rendered to files, checked on SVG elements and on pixels."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.viz import KIND_COLOURS, ROLE_COLOURS


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(x)))


SPEC = {
    "weights": [
        {"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "block.2", "method": "2:4"},
    ],
    "activations": [{"target": "head", "mask": "l1_unstructured", "sparsity": 0.25}],
}


@pytest.fixture(scope="module")
def sgm() -> fxs.SparseGraphModule:
    out = fxs.sparsify_graph(Net(), SPEC)
    out(torch.randn(4, 8))
    out.step()
    return out


def _needs_dot() -> None:
    pytest.importorskip("pydot")
    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot program is not installed")


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _pixels(path: Path) -> torch.Tensor:
    image = pytest.importorskip("matplotlib.image").imread(str(path))
    return (torch.as_tensor(image[..., :3]) * 255).round().to(torch.int64)


def _count(pixels: torch.Tensor, colour: str) -> int:
    return int((pixels == torch.tensor(_rgb(colour))).all(-1).sum())


def test_draw_svg_colours_the_mask_nodes_and_names_the_layers(sgm: fxs.SparseGraphModule, tmp_path: Path) -> None:
    _needs_dot()
    svg = sgm.draw(tmp_path / "g.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for role in ("weight_mask", "mask_buffer", "observer", "activation_mask", "module_call"):
        assert ROLE_COLOURS[role] in svg, role
    for label in ("block.0 (Linear)", "head (Linear)", "block_0_weight_masked", "head_input_observer"):
        assert label in svg, label
    assert svg.count("weight mask: ") == 3  # one mask node per weight target


def test_draw_one_submodule(sgm: fxs.SparseGraphModule, tmp_path: Path) -> None:
    _needs_dot()
    svg = sgm.draw(tmp_path / "block.svg", module="block").read_text()
    assert "block.0 (Linear)" in svg and "block.2 (Linear)" in svg
    assert "head (Linear)" not in svg and "head_input_observer" not in svg
    with pytest.raises(ValueError, match=r"no node of the graph runs inside 'blok'.*closest submodules: block"):
        sgm.draw(tmp_path / "x.svg", module="blok")


def test_draw_png_and_a_squashed_module(sgm: fxs.SparseGraphModule, tmp_path: Path) -> None:
    _needs_dot()
    png = fxs.viz.draw(sgm.squash(), tmp_path / "squashed.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = _pixels(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert _count(pixels, ROLE_COLOURS["module_call"]) > 100  # layer calls are back after squash
    with pytest.raises(ValueError, match="use a .svg, .png"):
        sgm.draw(tmp_path / "g.jpg")


def test_plot_sparsity_bars(sgm: fxs.SparseGraphModule, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = fxs.plot_sparsity(sgm, tmp_path / "s.png")
    pixels = _pixels(path)
    assert pixels.shape[1] == 800 and pixels.shape[0] > 150
    weight, activation = _count(pixels, KIND_COLOURS["weight"]), _count(pixels, KIND_COLOURS["activation"])
    assert weight > 3 * activation > 0  # three weight bars at 50 %, one activation bar at 25 %
    plain = fxs.plot_sparsity(sgm.squash(), tmp_path / "plain.png")  # any module: fraction of zeros per tensor
    assert _count(_pixels(plain), KIND_COLOURS["tensor"]) > 0


def test_plot_mask_shows_the_pattern(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 256), nn.Linear(256, 128))
    spec = {
        "weights": [
            {"target": "0", "method": "2:4"},
            {"target": "2", "method": "block", "sparsity": 0.75, "block_shape": (4, 4)},
        ]
    }
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    pixels = _pixels(fxs.plot_mask(sgm, "0.weight", tmp_path / "nm.png"))
    kept, pruned = _count(pixels, "#1d3557"), _count(pixels, "#f1f1f1")
    assert kept / (kept + pruned) == pytest.approx(0.5, abs=0.03)  # 2:4: half of the cells
    big = _pixels(fxs.plot_mask(sgm, "2.weight", tmp_path / "block.png"))  # 128 x 256: overview + a crop
    kept, pruned = _count(big, "#1d3557"), _count(big, "#f1f1f1")
    assert kept / (kept + pruned) == pytest.approx(0.25, abs=0.08)
    with pytest.raises(KeyError, match="no target '1.weigth'"):
        fxs.plot_mask(sgm, "1.weigth", tmp_path / "x.png")


def test_without_the_extra_the_error_names_it(
    sgm: fxs.SparseGraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match=r"pip install fx-sparsify\[viz\]"):
        fxs.plot_sparsity(sgm, tmp_path / "s.png")
    with pytest.raises(ImportError, match=r"pip install fx-sparsify\[viz\]"):
        fxs.plot_mask(sgm, "head.weight", tmp_path / "m.png")
    with pytest.raises(ImportError, match=r"pip install fx-sparsify\[viz\]"):
        sgm.draw(tmp_path / "g.svg")


def test_draw_an_export_capture_names_the_layer_of_each_op(tmp_path: Path) -> None:
    _needs_dot()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    sgm = fxs.sparsify_graph(
        model, {"weights": [{"target": "0", "method": "2:4"}]}, example_inputs=(torch.randn(2, 8),), capture="export"
    )
    svg = sgm.draw(tmp_path / "export.svg", module="0").read_text()
    assert "@ 0 (Linear)" in svg and "_0_weight_masked" in svg and "@ 2 (Linear)" not in svg


def _resnet18_like() -> torch.nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("shrink_resnet_for_viz", ROOT_EXAMPLES / "shrink_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet18(width=8).eval()


ROOT_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_full_graph_collapses_repeated_blocks(tmp_path: Path, capture: str) -> None:
    """ResNet-18's full graph was 2199x6333 px: a block equal to an earlier one is drawn as one node."""
    pytest.importorskip("pydot")
    spec = {"weights": [{"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(_resnet18_like(), spec, example_inputs=(torch.randn(1, 3, 32, 32),), capture=capture)
    full = fxs.viz.draw(sgm, tmp_path / "full.dot", collapse=False).read_text()
    small = fxs.viz.draw(sgm, tmp_path / "small.dot").read_text()
    assert "same as layer1.0" in small and "same as layer2.0" in small  # layer1.1, and layer3.0 after layer2.0
    for block in ("layer1.1", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"):
        assert f'"{block}\\nsame as' in small, block
    assert "layer1.0.conv1" in small and "layer2.0.downsample" in small  # the first of each kind stays whole
    assert small.count("->") < full.count("->") / 2
    assert "same as" not in full


def test_pictures_show_new_widths(tmp_path: Path) -> None:
    pytest.importorskip("pydot")
    widths = {
        "modules": {
            "block.0": {
                "type": "Conv2d",
                "in_channels": 4,
                "out_channels": 4,
                "groups": 1,
                "before": {"out_channels": 8},
            }
        },
        "tensors": {"block.0.weight": [4, 4, 3, 3]},
        "before": {"block.0.weight": [8, 4, 3, 3]},
    }
    assert fxs.viz.width_notes(widths) == {"block.0": "out_channels 8→4"}
    assert fxs.viz.width_notes({"modules": {}, "tensors": widths["tensors"], "before": widths["before"]}) == {
        "block.0": "weight 8x4x3x3→4x4x3x3"
    }  # an export capture keeps no modules: the weight's shape
    model = torch.nn.Sequential()
    model.add_module("block", torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU()))
    sgm = fxs.sparsify_graph(
        model,
        {"weights": [{"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5}]},
        example_inputs=(torch.randn(1, 4, 8, 8),),
    )
    dot = fxs.viz.draw(sgm, tmp_path / "g.dot", widths=widths).read_text()
    assert "out_channels 8→4" in dot
