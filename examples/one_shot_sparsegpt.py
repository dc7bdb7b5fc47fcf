"""One-shot pruning with weight reconstruction (docs/one-shot.md), run by the tests.

Prunes every Linear of an MLP but its head to 50 % with magnitude, Wanda and SparseGPT from the same
calibration batches, and prints how far each pruned model's outputs move from the dense model's on
held-out inputs. The inputs have a few large features, as language models' activations do, which is
where ranking by |W| alone goes wrong.
"""

from __future__ import annotations

import torch
from torch import nn

import fx_sparsify as fxs

RULES = {
    "magnitude": {"method": "l1_unstructured", "sparsity": 0.5},
    "wanda": {"method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},  # or "n": 2, "m": 4
}


def model_and_data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    scale = torch.exp(torch.randn(64))  # per-feature scales: a few outlier features
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 10))
    calibration = [torch.randn(32, 64) * scale for _ in range(8)]
    held_out = torch.randn(512, 64) * scale
    return model, calibration, held_out


def main() -> dict[str, float]:
    model, calibration, held_out = model_and_data()
    with torch.no_grad():
        dense = model(held_out)
    errors = {}
    for name, rule in RULES.items():
        spec = {"weights": [{"target": "type:Linear", **rule}, {"target": "4", "method": "dense"}]}
        sgm = fxs.sparsify_graph(model, spec)
        with torch.no_grad():
            for batch in calibration:  # forward passes collect each layer's input statistics
                sgm(batch)
        sgm.step()  # masks chosen (and, for sparsegpt, the remaining weights updated)
        with torch.no_grad():
            errors[name] = float((sgm(held_out) - dense).square().mean() / dense.square().mean())
        print(f"{name:10s} sparsity {sgm.sparsity()['0.weight']:.0%}  relative output error {errors[name]:.4f}")
    return errors


if __name__ == "__main__":
    main()
