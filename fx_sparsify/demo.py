"""The demo: ``python -m fx_sparsify.demo``.

Builds a small CNN + MLP model, sparsifies it, prints the rewritten graph (mask nodes visible) and the
report, squashes, exports, and checks the exported program against the masked module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

__all__ = ["DemoNet", "main"]


class DemoNet(nn.Module):
    """Conv + BatchNorm, a depthwise conv, an embedding of a class id, and a two-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.label = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dw(F.relu(self.bn(self.conv(image)))))
        x = torch.cat([F.adaptive_avg_pool2d(x, 1).flatten(1), self.label(label)], dim=1)
        return self.fc2(F.relu(self.fc1(x)))


SPEC = {
    "seed": 0,
    "weights": [
        {"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "label", "method": "l1_unstructured", "sparsity": 0.25},
        {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.75},
        {"target": "dw", "method": "dense"},
    ],
}


def main() -> int:
    torch.manual_seed(0)
    model = DemoNet().eval()
    inputs = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))

    sgm = fxs.sparsify_graph(model, SPEC, example_inputs=inputs)
    print("== rewritten graph (mask nodes: *_mask, *_masked, embedding_masked) ==")
    print(sgm.graph)
    sgm.step()
    print("== sparsity report ==")
    print(sgm.report())

    squashed = sgm.squash()
    print("== squashed graph ==")
    print(squashed.graph)
    program = fxs.export(squashed, inputs)
    print("== exported program (graph signature) ==")
    print(program.graph_signature)

    with torch.no_grad():
        masked, exported = sgm(*inputs), program.module()(*inputs)
    torch.testing.assert_close(exported, masked)
    fresh = DemoNet().eval()
    fresh.load_state_dict(squashed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), masked)
    print("OK: exported outputs equal the masked model; the squashed state_dict loads into DemoNet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
