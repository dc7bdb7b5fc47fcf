"""Quickstart: sparsify, inspect, calibrate, step, squash, export — the README's quick start."""

import torch
from torch import nn

import fx_sparsify as fxs

model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
spec = {
    "seed": 0,
    "weights": [
        {"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "2", "method": "2:4"},  # N:M on the middle layer (the last rule wins)
        {"target": "4", "method": "dense"},  # keep the classifier dense
    ],
    "activations": [
        {"target": "4", "aggregate": "sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.25},
    ],
}
sgm = fxs.sparsify_graph(model, spec)
print(sgm.graph)  # the mask nodes: *_mask buffers, *_masked multiplies, *_input_observer

for _ in range(4):  # calibration batches for the activation observer
    sgm(torch.randn(16, 32))
sgm.step()  # weight masks from the weights, activation masks from the statistics
print(sgm.report())

squashed = sgm.squash()  # a plain GraphModule, masks folded into the weights
x = torch.randn(8, 32)
torch.testing.assert_close(squashed(x), sgm(x))
model.load_state_dict(squashed.state_dict())  # loads into the original model
program = fxs.export(squashed, (x,))  # torch.export.ExportedProgram, no fx_sparsify op inside
print(fxs.sparsity(sgm))
