"""Data sparsifier flow 1 (docs/data.md): sparsify a plain tensor, a parameter and an embedding bag, then squash."""

import torch
from torch import nn

import fx_sparsify.data as fxd

tensor1 = torch.randn(100, 100)
param1 = nn.Parameter(torch.randn(200, 32))
emb_bag = nn.EmbeddingBag(50, 16)

sparsifier = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
sparsifier.add_data(name="tensor1", data=tensor1)
sparsifier.add_data(name="param1", data=param1)
sparsifier.add_data(name="emb_bag", data=emb_bag, sparsity_level=0.3)  # per-data config
sparsifier.step()  # computes the masks

for name in ("tensor1", "param1", "emb_bag"):
    mask = sparsifier.get_mask(name)
    print(f"{name}: {1 - mask.float().mean().item():.2f} sparse")

sparsifier.squash_mask()  # writes the masked values into tensor1, param1 and emb_bag.weight
assert (tensor1 == 0).float().mean().item() >= 0.5
assert torch.equal(emb_bag.weight == 0, ~sparsifier.get_mask("emb_bag"))
