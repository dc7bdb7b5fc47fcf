"""fxs.Sparsify: the standalone sparsifying module (dmx-style), on the same mask core as the graph."""

from __future__ import annotations

import pytest
import torch

import fx_sparsify as fxs


def _x(seed: int = 0, shape: tuple[int, ...] = (4, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _topk_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    flat = torch.zeros(x.numel())
    flat[x.flatten().topk(keep).indices] = 1.0
    return flat.view_as(x)


def test_topk_forward_and_density() -> None:
    x = _x()
    sp = fxs.Sparsify(x.shape, sparseness="TOPK{0.5}")
    y = sp(x)
    torch.testing.assert_close(y, x * _topk_mask(x, 16), rtol=0, atol=0)  # topk ranks raw values
    assert sp.density == 0.5 and sp.backward_mode == "STE"


def test_nm_shorthand_keeps_n_of_every_m() -> None:
    x = _x(1, (4, 16))
    y = fxs.Sparsify(x.shape, sparseness="BTOPK{2:4,-1}")(x)
    groups = (y != 0).view(4, 4, 4).sum(-1)
    assert torch.all(groups == 2)


@pytest.mark.parametrize("mode, dense_gradient", [("STE", True), ("MASK", False)])
def test_input_gradient_ste_and_mask(mode: str, dense_gradient: bool) -> None:
    x = _x().requires_grad_()
    sp = fxs.Sparsify(x.shape, sparseness="TOPK{0.25}", backward_mode=mode)
    g = _x(2)
    sp(x).backward(g)
    keep = sp.mask.bool()
    expected = g if dense_gradient else g * keep
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["supermask", "joint"])
def test_scores_get_the_straight_through_gradient(mode: str) -> None:
    x = _x().requires_grad_()
    sp = fxs.Sparsify(x.shape, sparseness="TOPK{0.5}", backward_mode=mode)
    sp.init_scores(_x(3).abs())
    y = sp(x)
    keep = sp.mask.bool()
    assert torch.equal(keep, _topk_mask(sp.scores.detach(), 16).bool())  # the mask ranks the scores
    torch.testing.assert_close(y, x.detach() * keep, rtol=0, atol=0)
    g = _x(4)
    y.backward(g)
    torch.testing.assert_close(sp.scores.grad, g * x.detach(), rtol=0, atol=0)  # d(x * s)/ds, straight through
    if mode == "supermask":
        assert x.grad is None  # only the scores learn
    else:
        torch.testing.assert_close(x.grad, g * keep, rtol=0, atol=0)


def test_bernoulli_supermask_samples_sigmoid_scores() -> None:
    shape = (64, 64)
    gen = torch.Generator().manual_seed(0)
    sp = fxs.Sparsify(shape, sparseness="BERN", backward_mode="supermask", generator=gen)
    scores = torch.linspace(-4, 4, 64 * 64).view(shape)
    sp.init_scores(scores)
    x = torch.ones(shape)
    sp.train()
    y = sp(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert sp.density == pytest.approx(torch.sigmoid(scores).mean().item(), abs=0.02)  # sampled
    g = torch.ones(shape)
    y.backward(g)
    sig = torch.sigmoid(scores)
    torch.testing.assert_close(sp.scores.grad, sig * (1 - sig))  # through sigmoid, straight through the sample
    sp.eval()
    assert torch.equal(sp(x), (sig > 0.5).float())  # deterministic in eval
    # reproducible: the same generator seed draws the same mask
    again = fxs.Sparsify(
        shape, sparseness="BERN", backward_mode="supermask", generator=torch.Generator().manual_seed(0)
    )
    again.init_scores(scores)
    assert torch.equal(again(x), y.detach())


def test_supermask_training_changes_the_mask() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    sp = fxs.Sparsify(weight.shape, sparseness="TOPK{0.5}", backward_mode="supermask")
    sp.init_scores(weight.abs())
    opt = torch.optim.SGD(sp.parameters(), lr=0.5)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = (x @ sp(weight).T - target).pow(2).mean()
        loss.backward()
        opt.step()
        first = sp.mask.clone() if first is None else first
    assert not torch.equal(sp.mask, first)
    assert sp.density == 0.5


def test_configure_and_shorthand_suffix() -> None:
    sp = fxs.Sparsify((4, 8), sparseness="TOPK{0.5}(M)")
    assert sp.backward_mode == "MASK" and sp.method == "topk"
    sp.configure(sparseness="DENSE")
    assert torch.equal(sp(_x()), _x()) and sp.density == 1.0
    sp.configure(backward_mode="U")
    assert sp.backward_mode == "STE"
    sp.configure(sparseness="l1_unstructured", sparsity=0.75)
    sp(_x())
    assert sp.density == 0.25
    assert "l1_unstructured" in repr(sp)


def test_bad_configuration_is_rejected_and_leaves_the_module_unchanged() -> None:
    sp = fxs.Sparsify((4, 8), sparseness="TOPK{0.5}")
    with pytest.raises(ValueError, match="backward_mode"):
        sp.configure(backward_mode="straight")
    with pytest.raises(KeyError, match="l1_unstructured"):  # the error lists the available methods
        sp.configure(sparseness="no_such_method")
    with pytest.raises((ValueError, TypeError)):
        sp.configure(sparseness="l1_unstructured", sparsity=1.5)
    assert (sp.method, sp.backward_mode) == ("topk", "STE")
    with pytest.raises(ValueError, match="supermask"):
        sp.init_scores(torch.ones(4, 8))
