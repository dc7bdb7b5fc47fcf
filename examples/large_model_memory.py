"""The memory-frugal pipeline for a model that fills much of the machine (docs/memory.md).

``inplace=True`` rewrites your model itself (no copy); ``"mode": "inplace"`` zeroes the pruned
weights in place (no mask multiply, nothing cached); squash then shares every weight with the model.
Extra memory: the bool masks (a quarter of an fp32 weight, half of a bf16 one) and a step's
temporaries (a fraction of the largest weight).
"""

from __future__ import annotations

import torch
from torch import nn

import fx_sparsify as fxs


def main(layers: int = 4, dim: int = 256) -> nn.Module:
    model = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).to(torch.bfloat16).eval()
    spec = {"mode": "inplace", "weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, inplace=True)  # your model is rewritten: no copy
    sgm.step()  # masks computed a target at a time; pruned weights zeroed in place
    x = torch.randn(8, dim, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = sgm(x)
    small = sgm.squash()  # shares the (already masked) weights: no new tensor
    assert all(small.get_parameter(f"{i}.weight") is model[i].weight for i in range(layers))
    with torch.no_grad():
        assert torch.equal(small(x), expected)
    masks = sum(sgm.get_buffer(r.buffer).nbytes for r in sgm._fxs.targets.values())
    weights = sum(model[i].weight.nbytes for i in range(layers))
    print(f"masks: {masks / weights:.2f} x the bf16 weights; sparsity {sgm.sparsity()}")
    return small


if __name__ == "__main__":
    main()
