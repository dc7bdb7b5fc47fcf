"""Data sparsifier flow 3 (docs/data.md): sparsify the training data itself, batch by batch."""

import torch
from torch import nn

import fx_sparsify.data as fxd

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
batches = [(torch.randn(8, 16), torch.randn(8, 1)) for _ in range(5)]

data_sparsifier = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
data_name = "train_data"
for x, y in batches:
    x = data_sparsifier.add_data(name=data_name, data=x)  # the masked batch (mask kept across batches)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    data_sparsifier.step()  # the next batch is masked by this batch's mask
    print(f"loss {loss.item():.4f}, mask density {data_sparsifier.get_mask(data_name).float().mean().item():.2f}")
