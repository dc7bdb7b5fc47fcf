"""Pictures of a sparsified model (docs/recipes.md "Pictures"; needs the `viz` extra and graphviz's `dot`).

python examples/pictures.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import fx_sparsify as fxs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet_like import build  # noqa: E402  (the example model beside this file)

out = Path(sys.argv[1] if len(sys.argv) > 1 else "pictures")
out.mkdir(parents=True, exist_ok=True)
model = build(width=8)
sgm = fxs.sparsify_graph(model, fxs.load_spec(Path(__file__).resolve().parent / "recipes" / "resnet_like.toml"))
for _ in range(4):  # calibration for the activation rule on fc's input
    sgm(torch.randn(8, 3, 32, 32))
sgm.step()

sgm.draw(out / "graph.svg")  # the rewritten graph; or .png / .pdf / .dot
sgm.draw(out / "layer1.svg", module="layer1")  # only the nodes inside one submodule
fxs.plot_sparsity(sgm, out / "sparsity.png")  # one bar per target, achieved vs target
fxs.plot_mask(sgm, "fc.weight", out / "fc.png")  # the mask as an image: the 2:4 pattern shows
print(f"wrote graph.svg, layer1.svg, sparsity.png, fc.png to {out}")
