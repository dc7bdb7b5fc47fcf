"""Mask storage (SPEC §15): bool mask buffers a quarter of an fp32 weight, older float masks still read."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._masks import PACK_MIN, PackedMask, is_masked, keep_of, masked_copy, pending, zero_pruned_

from models import MLP

X = torch.randn(5, 16)


def _mask_buffers(sgm: fxs.SparseGraphModule) -> dict[str, torch.Tensor]:
    state = sgm._fxs
    return {r.name: sgm.get_buffer(r.buffer) for r in state.targets.values() if r.kind != "activation"}


@pytest.mark.parametrize(
    ("mode", "gradient"),
    [("graph", "mask"), ("graph", "ste"), ("graph", "supermask"), ("graph", "joint"), ("inplace", "mask")],
)
def test_weight_masks_are_bool_and_a_quarter_of_an_fp32_weight(mode: str, gradient: str) -> None:
    spec = {
        "mode": mode,
        "weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5, "gradient": gradient}],
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    for _ in range(2):
        sgm(X)
        sgm.step()
        for name, buf in _mask_buffers(sgm).items():
            weight = sgm.get_parameter(sgm._fxs.targets[name].param)
            assert buf.dtype == torch.bool, name
            assert buf.nbytes * 4 <= weight.nbytes, name
    assert all(m.dtype == torch.bool for m in sgm.masks().values())


def test_masks_stay_bool_through_dtype_and_device_moves() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}]})
    sgm.step()
    before = sgm.masks()["fc1.weight"]
    sgm.to(torch.bfloat16)
    (buf,) = _mask_buffers(sgm).values()
    assert buf.dtype == torch.bool and buf.nbytes * 2 <= sgm.fc1.weight.nbytes
    assert torch.equal(sgm.masks()["fc1.weight"], before)
    out = sgm(X.bfloat16())
    assert out.dtype == torch.bfloat16


def _float_state_dict(sgm: fxs.SparseGraphModule) -> dict[str, Any]:
    """``sgm.state_dict()`` as an older release wrote it: float 0/1 weight masks."""
    buffers = {r.buffer for r in sgm._fxs.targets.values() if r.kind != "activation"}
    return {k: (v.float() if k in buffers else v) for k, v in sgm.state_dict().items()}


def test_an_older_float_mask_checkpoint_loads_into_bool_buffers() -> None:
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    model = MLP()
    src = fxs.sparsify_graph(model, spec)
    src.step()
    saved = _float_state_dict(src)
    assert any(v.dtype == torch.float32 and k.endswith("_mask") for k, v in saved.items())
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    dst = fxs.sparsify_graph(model, spec)
    dst.load_state_dict(torch.load(buf))
    assert all(b.dtype == torch.bool for b in _mask_buffers(dst).values())
    for name, mask in src.masks().items():
        assert torch.equal(dst.masks()[name], mask)
    torch.testing.assert_close(dst(X), src(X), rtol=0, atol=0)


def test_a_float_mask_buffer_still_steps_and_squashes() -> None:
    """A module pickled by an older release holds float mask buffers: every stage reads them as masks."""
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(MLP(), spec)
    ref = copy.deepcopy(sgm)
    for r in sgm._fxs.targets.values():
        setattr(sgm, r.buffer, sgm.get_buffer(r.buffer).float())
    for m in (sgm, ref):
        m.step()
        m.step()
    assert {k: v.tolist() for k, v in sgm.masks().items()} == {k: v.tolist() for k, v in ref.masks().items()}
    torch.testing.assert_close(sgm.squash()(X), ref.squash()(X), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_in_place_masking_writes_positive_zeros_chunk_by_chunk(chunk: int) -> None:
    w = torch.randn(13, 9)
    w[0, 0] = float("nan")
    keep = torch.rand(13, 9) > 0.5
    keep[0, 0] = False
    want = torch.where(keep, w, torch.zeros(()))
    copied = masked_copy(w, keep, chunk=chunk)
    assert torch.equal(copied, want) and not copied.signbit()[~keep].any()
    assert torch.isnan(w[0, 0])  # the source is unchanged
    inplace = w.clone()
    assert zero_pruned_(inplace, keep.float(), chunk=chunk) is inplace
    assert torch.equal(inplace, want) and not inplace.signbit()[~keep].any()
    # non-contiguous weights and broadcast masks take the one-shot path
    assert torch.equal(masked_copy(w.t(), keep.t(), chunk=chunk), want.t())
    row = w.clone()
    zero_pruned_(row, keep[0], chunk=chunk)
    assert torch.equal(row, torch.where(keep[0], w, torch.zeros(())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_is_masked_needs_positive_zeros_at_every_pruned_entry(dtype: torch.dtype) -> None:
    w = torch.randn(40, 30).to(dtype)
    keep = torch.rand(40, 30) > 0.5
    masked = masked_copy(w, keep)
    assert is_masked(masked, keep) and is_masked(masked, keep, chunk=7)
    assert not is_masked(w, keep)
    flipped = masked.clone()
    flipped[~keep] = -0.0  # a negative zero is not what squash writes
    assert not is_masked(flipped, keep, chunk=7)
    assert is_masked(w, torch.ones(40, 30, dtype=torch.bool))


def test_keep_of_reads_any_dtype_as_a_keep_mask() -> None:
    mask = torch.tensor([0.0, 1.0, 1.0])
    assert keep_of(mask).tolist() == [False, True, True]
    bool_mask = mask.bool()
    assert keep_of(bool_mask) is bool_mask


def test_sparsify_module_keeps_a_bool_mask() -> None:
    sp = fxs.Sparsify((4, 8), sparseness="TOPK{0.5}", backward_mode="supermask")
    x = torch.randn(4, 8, requires_grad=True)
    sp(x).sum().backward()
    assert sp.mask.dtype == torch.bool and sp.density == 0.5
    assert sp.scores is not None and sp.scores.grad is not None
    state = nn.Module.state_dict(sp)
    assert state["mask"].dtype == torch.bool


@pytest.mark.parametrize("n", [1, 13, 1000, 70001])
@pytest.mark.parametrize("chunk", [8, 24, 1 << 18])
def test_packed_masks_round_trip(n: int, chunk: int) -> None:
    mask = torch.rand(n) > 0.4
    packed = PackedMask(mask.view(n, 1), chunk=chunk)
    assert packed.data.nbytes <= -(-n // 8) + -(-n // chunk)  # 1 bit per entry (at most a byte of padding per chunk)
    out = torch.zeros(n, 1, dtype=torch.bool)
    packed.unpack_into(out)
    assert torch.equal(out.view(-1), mask)
    floats = torch.full((n, 1), 7.0)
    packed.unpack_into(floats)
    assert torch.equal(floats.view(-1), mask.float())
    strided = torch.zeros(1, n, dtype=torch.bool).t()  # not contiguous
    packed.unpack_into(strided)
    assert torch.equal(strided.reshape(-1), mask)


def test_large_pending_masks_are_packed_small_ones_stay() -> None:
    big, small = torch.rand(PACK_MIN) > 0.5, torch.rand(100) > 0.5
    assert isinstance(pending(big), PackedMask)
    assert pending(small) is small


def test_step_on_large_targets_gives_the_exact_masks() -> None:
    """Large targets go through the packed path of step(): masks equal compute_mask's."""
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))
    spec = {
        "weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.7}, {"target": "2", "method": "2:4"}]
    }
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    assert model[0].weight.numel() >= PACK_MIN
    assert torch.equal(sgm.masks()["0.weight"], fxs.compute_mask("l1_unstructured", model[0].weight, sparsity=0.7))
    assert torch.equal(sgm.masks()["2.weight"], fxs.compute_mask("2:4", model[2].weight))
