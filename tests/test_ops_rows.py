"""Masked embedding rows with autograd off (issue 14): masked in place, same values as the masked table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_sparsify import ops

BAG_CASES = [
    {"mode": "sum"},
    {"mode": "mean"},
    {"mode": "max"},
    {"mode": "sum", "padding_idx": 3},
    {"mode": "mean", "padding_idx": -2},
    {"mode": "sum", "per_sample_weights": True},
    {"mode": "sum", "max_norm": 1.0},
    {"mode": "sum", "offsets": True},
    {"mode": "mean", "offsets": True, "include_last_offset": True},
]


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(40, 8).to(dtype))
    mask = torch.rand(40, 8) > 0.5
    ids = torch.randint(0, 40, (6, 5))
    ids[1, 2] = 3
    ids[2, 0] = 38
    return weight, mask, ids


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", BAG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_no_grad_bag_equals_the_masked_table_and_leaves_weight_and_mask_alone(case: dict, grad_mode: str) -> None:
    weight, mask, ids = _inputs()
    kwargs = dict(case)
    offsets = None
    if kwargs.pop("offsets", False):
        offsets = (
            torch.tensor([0, 4, 4, 13, 21, 30])
            if kwargs.get("include_last_offset")
            else torch.tensor([0, 4, 4, 13, 21])
        )
        ids = ids.reshape(-1)
    if kwargs.pop("per_sample_weights", False):
        kwargs["per_sample_weights"] = torch.rand(ids.shape)
    max_norm = kwargs.get("max_norm")
    before_w, before_m = weight.detach().clone(), mask.clone()
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode()
    with ctx:
        got = ops.embedding_bag_masked(ids, weight, mask, offsets, **kwargs)
    # the reference: the same call on the masked table (max_norm renormalises the referenced rows of the
    # weight in place, so the reference starts from the weight as it was and is renormalised the same way)
    ref_weight = before_w.clone()
    with torch.no_grad():
        rows = F.embedding(ids.reshape(-1), ref_weight, None, max_norm)
        index = torch.arange(rows.shape[0]).view(ids.shape)
        pad = kwargs.get("padding_idx")
        if pad is not None:
            pad_value = pad % weight.shape[0]
            index = torch.where(ids == pad_value, rows.shape[0], index)
            rows = torch.cat([rows * mask[ids.reshape(-1)].float(), rows.new_zeros(1, rows.shape[1])])
            pad = rows.shape[0] - 1
        else:
            rows = rows * mask[ids.reshape(-1)].float()
        want = F.embedding_bag(
            index,
            rows,
            offsets,
            mode=kwargs["mode"],
            per_sample_weights=kwargs.get("per_sample_weights"),
            include_last_offset=kwargs.get("include_last_offset", False),
            padding_idx=pad,
        )
    assert torch.equal(got, want)
    assert torch.equal(mask, before_m)
    if max_norm is None:
        assert torch.equal(weight.detach(), before_w)  # the gathered rows are masked in place, never the table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_no_grad_rows_equal_the_grad_mode_rows(dtype: torch.dtype) -> None:
    weight, mask, ids = _inputs(dtype)
    with torch.no_grad():
        bag, rows = ops.embedding_bag_masked(ids, weight, mask, mode="sum"), ops.embedding_masked(ids, weight, mask)
    with torch.enable_grad():
        bag_grad, rows_grad = (
            ops.embedding_bag_masked(ids, weight, mask, mode="sum"),
            ops.embedding_masked(ids, weight, mask),
        )
    assert bag.dtype == rows.dtype == dtype
    assert torch.equal(bag, bag_grad.detach()) and torch.equal(rows, rows_grad.detach())
    assert torch.equal(rows, F.embedding(ids, weight.detach() * mask.to(dtype)))


def test_a_float_mask_of_another_dtype_keeps_the_promoted_dtype() -> None:
    weight, mask, ids = _inputs(torch.bfloat16)
    fmask = mask.float()
    with torch.no_grad():
        out = ops.embedding_masked(ids, weight, fmask)
    assert out.dtype == torch.float32  # as weight * mask would: never written into the bf16 rows
    assert torch.equal(out, F.embedding(ids, weight.detach().float() * fmask))


def test_grad_mode_gradient_is_unchanged() -> None:
    weight, mask, ids = _inputs()
    ops.embedding_bag_masked(ids, weight, mask, mode="sum").square().sum().backward()
    ref = weight.detach().clone().requires_grad_(True)
    F.embedding_bag(ids, ref * mask.float(), mode="sum").square().sum().backward()
    assert torch.equal(weight.grad, ref.grad)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("per_bag", [1, 3])
def test_special_values_and_bags_of_one_match_the_grad_mode_path(mode: str, per_bag: int) -> None:
    weight, mask, _ = _inputs()
    with torch.no_grad():
        weight[0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
        weight[1, :2] = torch.tensor([-float("inf"), -1e-40])  # a subnormal
    mask[0, :3] = torch.tensor([True, True, False])
    ids = torch.tensor([[0, 1, 2], [1, 0, 5], [7, 7, 7], [0, 3, 1]])[:, :per_bag]
    with torch.no_grad():
        got = ops.embedding_bag_masked(ids, weight, mask, mode=mode)
    want = ops.embedding_bag_masked(ids, weight, mask, mode=mode).detach()  # grad mode: gather, cast, multiply
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.shape == (4, 8)
