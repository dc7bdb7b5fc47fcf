"""The demo: ``python -m fx_sparsify.demo``.

Prints its spec, builds a small CNN + MLP model, sparsifies it, prints the rewritten graph (mask nodes
visible) and the report, squashes, exports, checks the exported program against the masked module,
and shows the outcome: zeros, bytes on disk (dense vs ``fxs.save_compressed`` where available) and
forward time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

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


def _ms_per_forward(
    modules: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], repeats: int = 30
) -> dict[str, float]:
    """Median wall time of one no_grad forward pass per module, in ms (rounds interleaved, so noise is shared)."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for module in modules.values():
            module(*inputs)
        for _ in range(repeats):
            for name, module in modules.items():
                start = time.perf_counter()
                module(*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def _outcome(model: nn.Module, squashed: nn.Module, sgm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Zeros, file sizes and forward times of the original, masked and squashed models."""
    state = squashed.state_dict()
    total = sum(t.numel() for t in state.values())
    zeros = sum(int((t == 0).sum()) for t in state.values() if t.is_floating_point())
    print(f"squashed weights: {zeros:,} of {total:,} values are zero ({zeros / total:.1%})")
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "dense.pt")
        torch.save(state, dense)
        line = f"on disk: torch.save {os.path.getsize(dense) / 1024:.1f} KiB"
        if hasattr(fxs, "save_compressed"):
            packed = os.path.join(tmp, "model.safetensors")
            fxs.save_compressed(squashed, packed)
            line += f", fxs.save_compressed {os.path.getsize(packed) / 1024:.1f} KiB"
        print(line)
    sgm.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the steadiest timing on a shared machine (restored below)
    try:
        ms = _ms_per_forward({"original": model, "masked": sgm, "squashed": squashed}, inputs)
    finally:
        torch.set_num_threads(threads)
    print(
        f"forward, median ms at batch {inputs[0].shape[0]}, 1 thread (noisy on a shared machine): "
        + ", ".join(f"{name} {value:.2f}" for name, value in ms.items())
    )
    print(
        "  the squashed model runs the original's dense layers with zeros in their weights: unstructured zeros "
        "save no time in dense kernels, so it times as the original, up to noise. The masked model also pays "
        "for its mask multiplies. Faster models come from removing channels (squash(shrink=True)) or sparse "
        "storage (squash(storage='auto')): see examples/shrink_resnet.py and docs/smaller-faster.md"
    )


def main() -> int:
    print("== spec ==")
    print(json.dumps(SPEC, indent=2))
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
    print("== outcome ==")
    _outcome(model, squashed, sgm, inputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
