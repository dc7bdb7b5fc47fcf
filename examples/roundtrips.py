"""Round trips with torch's pruning tools and with your own model (docs/roundtrips.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

import fx_sparsify as fxs


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


torch.manual_seed(0)
x = torch.randn(4, 16)
spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}

# 1. a model pruned with torch.nn.utils.prune is taken over: its masks become the initial masks
model = mlp()
prune.l1_unstructured(model[0], "weight", amount=0.3)
sgm = fxs.sparsify_graph(model, spec)
print(sgm.report())  # 0.weight: "l1_unstructured (adopted)"
sgm.step()  # 50 %, keeping the 30 % prune already removed

# 2. initial masks given explicitly
keep = torch.rand(32, 16) > 0.5
explicit = fxs.sparsify_graph(mlp(), spec, masks={"0.weight": keep})
assert torch.equal(explicit.masks()["0.weight"], keep)

# 3. back to prune's layout (weight_orig, weight_mask, a forward pre-hook)
eager = mlp()
eager.load_state_dict(sgm.squash().state_dict())
sgm.to_torch_prune(eager)
assert prune.is_pruned(eager) and torch.equal(eager[0].weight_mask.bool(), sgm.masks()["0.weight"])

# 4. the squashed weights written into your own model instance (a Hugging Face model keeps save_pretrained)
own = mlp()
assert sgm.squash_into(own) is own
torch.testing.assert_close(own(x), sgm(x))
print({name: f"{(p == 0).float().mean():.0%} zeros" for name, p in own.named_parameters() if name.endswith("weight")})
