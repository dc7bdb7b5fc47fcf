"""squash() of a module with RNN layers: the rewritten weights are the RNN's parameters at once, also in its
``_flat_weights`` (it kept the old tensors until the next forward; PyTorch's own pruning test checks them right
after ``prune.remove``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(8, 16, num_layers=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_squash_refreshes_the_flat_weights_of_rnn_layers(kind: type[nn.RNNBase]) -> None:
    x = torch.randn(5, 3, 8)
    sgm = fxs.sparsify_graph(
        Recurrent(kind), {"weights": [{"target": r"re:rnn\.weight_.*", "method": "l1_unstructured", "sparsity": 0.5}]}
    )
    sgm.step()
    squashed = sgm.squash()
    rnn = squashed.get_submodule("rnn")
    assert all(isinstance(w, nn.Parameter) for w in rnn._flat_weights)
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    assert float((rnn.weight_ih_l0 == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(squashed(x), sgm(x))
