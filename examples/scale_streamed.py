"""Prune a model one block at a time from its checkpoint, on one process or several (docs/scale.md).

    python examples/scale_streamed.py                        # one process
    torchrun --nproc-per-node 2 examples/scale_streamed.py   # two ranks, each calibrating on half the batches

Only one block's weights are in memory at a time; under torchrun every rank ends with the same result,
equal to one process that saw all the batches, and rank 0 writes it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import fx_sparsify as fxs


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Model(nn.Module):
    def __init__(self, d: int = 64, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))  # the repeated blocks prune_streamed finds
        self.head = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def main(folder: str | None = None) -> nn.Module:
    if "RANK" in os.environ and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    work = Path(folder or tempfile.mkdtemp())
    if not dist.is_initialized() or dist.get_rank() == 0:  # a checkpoint to start from
        torch.manual_seed(0)
        save_file(Model().state_dict(), str(work / "model.safetensors"))
    if dist.is_initialized():
        dist.barrier()

    spec = {
        "weights": [
            {"target": "re:blocks\\.\\d+\\.(up|down)", "method": "sparsegpt", "sparsity": 0.5, "sequential": True}
        ]
    }
    calibration = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    sparsity = fxs.prune_streamed(Model, work / "model.safetensors", spec, calibration, work / "pruned")
    model = fxs.load_compressed(work / "pruned", Model())  # the pruned model, loaded shard by shard

    assert all(abs(s - 0.5) < 1e-6 for s in sparsity.values())
    assert float((model.blocks[0].up.weight == 0).float().mean()) == 0.5
    return model


if __name__ == "__main__":
    main()
