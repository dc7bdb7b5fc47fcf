"""Mask nodes with bool masks (SPEC §15): same values and gradients as a float multiply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fx_sparsify import ops


def test_apply_mask_gradient_and_double_backward() -> None:
    w = torch.randn(6, 5, requires_grad=True)
    m = torch.rand(6, 5) > 0.5
    out = ops.apply_mask(w, m)
    assert torch.equal(out, w.detach() * m.float())
    (grad,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    assert torch.equal(grad, 2 * w.detach() * m.float())
    grad.sum().backward()  # differentiable backward: Hessian-vector products still work
    assert torch.equal(w.grad, 2 * m.float())


def test_masked_embedding_rows_equal_the_masked_table() -> None:
    w, m = torch.randn(50, 8, requires_grad=True), torch.rand(50, 8) > 0.5
    i = torch.randint(0, 50, (4, 6))
    table = w * m.float()
    torch.testing.assert_close(ops.embedding_masked(i, w, m), F.embedding(i, table))
    offsets = torch.tensor([0, 5, 11])
    flat = i.reshape(-1)
    torch.testing.assert_close(
        ops.embedding_bag_masked(flat, w, m, offsets, mode="sum"), F.embedding_bag(flat, table, offsets, mode="sum")
    )
