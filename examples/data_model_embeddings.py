"""Data sparsifier flow 2 (docs/data.md): sparsify every embedding table of a model, save and restore the masks."""

import io

import torch
from torch import nn

import fx_sparsify.data as fxd


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(1000, 32)
        self.items = nn.EmbeddingBag(500, 32, mode="sum")
        self.head = nn.Linear(64, 1)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.users(user), self.items(items)], dim=1))


model = Recommender()
sparsifier = fxd.DataNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
for fqn, module in model.named_modules():
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        sparsifier.add_data(name=fqn.replace(".", "_"), data=module)  # names cannot contain '.'
sparsifier.step()

buffer = io.BytesIO()
torch.save(sparsifier.state_dict(), buffer)  # masks are bit-packed
buffer.seek(0)
restored = fxd.DataNormSparsifier()
restored.load_state_dict(torch.load(buffer))
assert torch.equal(restored.get_mask("users"), sparsifier.get_mask("users"))

sparsifier.squash_mask()  # the model's own embedding weights are now sparse
print(f"users: {(model.users.weight == 0).float().mean().item():.2f} sparse")
out = model(torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]]))
print(out.shape)
