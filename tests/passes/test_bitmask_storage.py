"""squash(storage="bitmask" / "auto" / "auto-model" / recorded choices) (SPEC §18): outputs equal the dense
squash, dense state dicts under the original keys, export / compile, choices saved and reused.

Tolerance: the bitmask kernel sums in another order than ``F.linear`` (float32 sums either way), so
outputs agree to ``atol=rtol=1e-5`` in float32 (bfloat16: the rounding of the output, ``2e-2``).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _native
from fx_sparsify._bitmask import MODEL_MARGIN, BitmaskLinear, modelled_ratio
from fx_sparsify.passes import sparse_storage
from fx_sparsify.passes.sparse_storage import SparseLinear

from models import MLP

LINEAR = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.6}]}
needs_lib = pytest.mark.skipif(_native.LIB is None, reason="the C kernels are not built (no C compiler at install)")


def _sgm(model: nn.Module, spec: dict[str, Any] = LINEAR, **kwargs: Any) -> fxs.SparseGraphModule:
    sgm = fxs.sparsify_graph(model, spec, **kwargs)
    sgm.step()
    return sgm


@pytest.fixture(params=["kernel", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with the C kernel (where built) and with the torch path (``_native.LIB = None``)."""
    if request.param == "kernel" and _native.LIB is None:
        pytest.skip("the C kernels are not built")
    if request.param == "torch":
        monkeypatch.setattr(_native, "LIB", None)
    return request.param


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_bitmask_layers_equal_the_dense_squash_and_keep_dense_state(capture: str, path: str) -> None:
    x = torch.randn(5, 16)
    sgm = _sgm(MLP(), capture=capture, example_inputs=(x,))
    dense, small = sgm.squash(), sgm.squash(storage="bitmask")
    assert all(isinstance(small.get_submodule(n), BitmaskLinear) for n in ("fc1", "fc2", "head"))
    others = (torch.randn(1, 16), torch.randn(2, 3, 16), torch.randn(16), torch.randn(0, 16), torch.randn(16, 7).T)
    for inp in (x, torch.randn(16, 5).T) + (others if capture == "fx" else ()):  # .T: non-contiguous inputs
        torch.testing.assert_close(small(inp), dense(inp), atol=1e-5, rtol=1e-5)
    sd, want = small.state_dict(), dense.state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in sd)
    assert [c.storage for c in small.storage_choices] == ["bitmask"] * 3
    eager = MLP()
    eager.load_state_dict(sd)  # the user's own model takes the bitmask module's weights
    torch.testing.assert_close(eager(x), dense(x))
    torch.testing.assert_close(copy.deepcopy(small)(x), small(x))
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), small(x))
    assert "bitmask, 6" in repr(small.fc1)  # "bitmask, 60.0% zeros"


def test_load_state_dict_repacks_and_checks_shapes() -> None:
    sgm = _sgm(MLP())
    small, other = sgm.squash(storage="bitmask"), _sgm(MLP()).squash(storage="bitmask")
    other.load_state_dict(small.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), small(x))
    with pytest.raises(RuntimeError, match="size mismatch for fc1.weight"):
        other.load_state_dict({**small.state_dict(), "fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="Missing key.*fc1.weight"):
        other.load_state_dict({k: v for k, v in small.state_dict().items() if k != "fc1.weight"})


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(8, 16, 1)
        self.k3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.k3(torch.relu(self.pw(x))).mean(dim=(2, 3)))


def test_pointwise_convs_and_bfloat16(path: str) -> None:
    spec = {
        "weights": [
            {"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.7},
            {"target": "fc", "method": "l1_unstructured", "sparsity": 0.5},
        ]
    }
    x = torch.randn(2, 8, 5, 5)
    sgm = _sgm(Net(), spec)
    dense, small = sgm.squash(), sgm.squash(storage="bitmask")
    assert isinstance(small.pw, BitmaskLinear) and small.pw.spatial == 2 and not isinstance(small.k3, BitmaskLinear)
    torch.testing.assert_close(small(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.pw(x[0]), dense.pw(x[0]), atol=1e-5, rtol=1e-5)  # unbatched
    low = _sgm(MLP().to(torch.bfloat16))
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    dense_b, small_b = low.squash(), low.squash(storage="bitmask")
    assert isinstance(small_b.fc1, BitmaskLinear)
    torch.testing.assert_close(small_b(xb), dense_b(xb), atol=2e-2, rtol=2e-2)
    half = _sgm(MLP().to(torch.float64)).squash(storage="bitmask")  # no bitmask kernel for float64
    assert not isinstance(half.fc1, BitmaskLinear) and "no bitmask kernel" in half.storage_choices[0].why


def test_export_and_compile_take_a_bitmask_module() -> None:
    x = torch.randn(3, 16)
    small = _sgm(MLP()).squash(storage="bitmask")
    want = small(x)
    ep = torch.export.export(small, (x,))
    assert "fx_sparsify.bitmask_linear" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), want)
    torch.testing.assert_close(torch.compile(small, backend="aot_eager")(x), want)
    torch.testing.assert_close(torch.compile(small)(x), want, atol=1e-5, rtol=1e-5)


def test_export_and_compile_take_a_layer_with_a_pick_index() -> None:
    """A 90 % sparse layer holds a pick index (on AVX-512 CPUs) that the op takes as its last input: export,
    compile and gradients work with it, at batch 1 (the pick path) and 3."""
    sgm = _sgm(MLP(), {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.9}]})
    dense, small = sgm.squash(), sgm.squash(storage="bitmask")
    if _native.bitmask_isa() in ("avx512", "avx512vbmi2"):
        assert small.fc1.pick is not None and small.fc2.pick is not None
    for batch in (1, 3):
        x = torch.randn(batch, 16)
        want = dense(x)
        torch.testing.assert_close(small(x), want, atol=1e-5, rtol=1e-5)
        ep = torch.export.export(small, (x,))
        assert "fx_sparsify.bitmask_linear" in str(ep.graph)
        torch.testing.assert_close(ep.module()(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.compile(small, backend="aot_eager")(x), want, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 16, requires_grad=True)
    (small(x) ** 2).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    (dense(xd) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_input_and_bias_through_the_dense_product() -> None:
    sgm = _sgm(MLP())
    dense, small = sgm.squash(), sgm.squash(storage="bitmask")
    x1, x2 = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    x2.requires_grad_(True)
    with torch.no_grad():
        x2.copy_(x1)
    (small(x1) ** 2).sum().backward()
    (dense(x2) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.fc1.bias.grad, dense.fc1.bias.grad, atol=1e-5, rtol=1e-5)
    torch.autograd.gradcheck(
        lambda v: torch.ops.fx_sparsify.bitmask_linear(
            v, small.fc2.values.double(), small.fc2.mask, small.fc2.row_offsets, None, 32
        ),
        torch.randn(2, 32, dtype=torch.float64, requires_grad=True),
    )


def test_bad_input_is_a_clear_error() -> None:
    small = _sgm(MLP()).squash(storage="bitmask")
    with pytest.raises(RuntimeError, match="in_features=16"):
        small(torch.randn(2, 15))
    with pytest.raises(RuntimeError, match="weight's dtype torch.float32, got torch.float64"):
        small(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D floating-point weight"):
        BitmaskLinear(torch.arange(6).view(2, 3), None)


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """``auto`` made deterministic: each candidate kind measures the ratio given for it."""
    ratios: dict[str, float] = {}

    def measure(dense: torch.Tensor, bias: torch.Tensor | None, layer: nn.Module, batch: int) -> tuple[float, float]:
        return 1.0, ratios["bitmask" if isinstance(layer, BitmaskLinear) else layer.layout]

    monkeypatch.setattr(sparse_storage, "MEASURE", measure)
    return ratios


@needs_lib
def test_auto_weighs_bitmask_and_records_the_ratio(fake_timing: dict[str, float]) -> None:
    sgm = _sgm(MLP())
    fake_timing.update(csr=0.95, bitmask=0.55)
    small = sgm.squash(storage="auto")
    assert all(isinstance(small.get_submodule(n), BitmaskLinear) for n in ("fc1", "fc2", "head"))
    first = small.storage_choices[0]
    assert (first.layer, first.shape, first.storage, first.ratio) == ("fc1", (32, 16), "bitmask", 0.55)
    assert first.why == "measured csr 0.95x, bitmask 0.55x dense at batch 1" and abs(first.sparsity - 0.6) < 0.01
    assert "| time / dense " in sgm.report() and "| 0.55x " in sgm.report()  # the ratio, per layer
    fake_timing.update(csr=0.5, bitmask=0.92)  # csr faster; bitmask above the margin does not matter
    assert isinstance(sgm.squash(storage="auto").fc1, SparseLinear)
    fake_timing.update(csr=0.95, bitmask=0.93)  # nothing under 0.9x: dense, with the best ratio recorded
    choice = sgm.squash(storage="auto").storage_choices[0]
    assert (choice.storage, choice.ratio) == ("dense", 0.93)


def test_auto_measures_for_real_and_never_keeps_a_slower_layer() -> None:
    """Real timing: whatever auto picks, the choice it records is at most the margin over dense."""
    sgm = _sgm(MLP(64, 256, 64), {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.9}]})
    small = sgm.squash(storage="auto")
    for c in small.storage_choices:
        assert c.ratio is not None and (c.storage == "dense" or c.ratio <= sparse_storage.MARGIN), c
    x = torch.randn(1, 64)
    torch.testing.assert_close(small(x), sgm.squash()(x), atol=1e-5, rtol=1e-5)


def test_auto_model_decides_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_storage, "MEASURE", None)  # any timing would fail
    spec = {
        "weights": [
            {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.9},
            {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.3},
        ]
    }
    sgm = _sgm(MLP(1024, 1024), spec)  # layers of 1 M entries: the model's smallest
    small = sgm.squash(storage="auto-model")
    by = {c.layer: c for c in small.storage_choices}
    if _native.LIB is None:
        assert by["fc1"].storage == "dense" and "not built" in by["fc1"].why
        return
    assert (
        modelled_ratio(0.9, torch.float32, 1, "avx512") < MODEL_MARGIN < modelled_ratio(0.3, torch.float32, 1, "avx512")
    )
    assert by["fc1"].storage == "bitmask" and by["fc1"].why.startswith("modelled") and by["fc1"].ratio < MODEL_MARGIN
    assert by["fc2"].storage == "dense" and "no timing" in by["fc2"].why
    assert by["head"].storage == "dense" and by["head"].why == "not a masked weight"
    tiny = _sgm(MLP(), spec).squash(storage="auto-model")  # 32x16: a call's fixed cost outweighs the bytes
    assert [c.storage for c in tiny.storage_choices] == ["dense"] * 3
    big = sgm.squash(storage="auto-model", batch_size=64)  # past the model's batch sizes: dense
    assert all(c.storage == "dense" for c in big.storage_choices)
    assert [c.storage for c in sgm.squash(storage="auto-model").storage_choices] == [
        c.storage for c in small.storage_choices
    ]  # the same on every run


def test_recorded_choices_are_reused_from_the_module_a_dict_or_a_file(tmp_path: Path, path: str) -> None:
    sgm = _sgm(MLP())
    first = sgm.squash(storage={"fc1": "bitmask", "fc2": "csr"})
    assert isinstance(first.fc1, BitmaskLinear) and isinstance(first.fc2, SparseLinear)
    assert not isinstance(first.head, (BitmaskLinear, SparseLinear))
    assert [c.why for c in first.storage_choices] == ["recorded choice"] * 3
    again = sgm.squash(storage=first.storage_choices)
    assert [type(again.get_submodule(n)) for n in ("fc1", "fc2", "head")] == [
        type(first.get_submodule(n)) for n in ("fc1", "fc2", "head")
    ]
    fxs.save_storage_choices(first.storage_choices, tmp_path / "choices.json")
    loaded = fxs.load_storage_choices(tmp_path / "choices.json")
    assert loaded == first.storage_choices
    from_file = sgm.squash(storage=loaded)
    x = torch.randn(3, 16)
    torch.testing.assert_close(from_file(x), sgm.squash()(x), atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "choices.json").read_text())["layers"][0]["storage"] == "bitmask"


def test_bad_recorded_choices_are_clear_errors(tmp_path: Path) -> None:
    sgm = _sgm(MLP())
    with pytest.raises(ValueError, match=r"recorded layers \['nope'\] are not"):
        sgm.squash(storage={"nope": "csr"})
    with pytest.raises(ValueError, match="storage 'coo'"):
        sgm.squash(storage={"fc1": "coo"})
    with pytest.raises(TypeError, match="a storage name"):
        sgm.squash(storage=3)
    with pytest.raises(TypeError, match="StorageChoice or a dict"):
        sgm.squash(storage=[1, 2])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a storage choices file"):
        fxs.load_storage_choices(bad)
    bad.write_text('{"format": "fx_sparsify-storage-choices", "version": 1, "layers": [{"layer": "fc1"}]}')
    with pytest.raises(ValueError, match="layer entry 0 is malformed"):
        fxs.load_storage_choices(bad)
    with pytest.raises(TypeError, match="StorageChoice records"):
        fxs.save_storage_choices(["fc1"], tmp_path / "x.json")  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fxs.save_storage_choices([], tmp_path / "missing" / "x.json")


def test_gpt2_conv1d_takes_bitmask_storage_or_stays_dense() -> None:
    """GPT-2's Conv1D (weight [in, out], an addmm under export): bitmask or dense, never CSR."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    ids = torch.randint(0, 50, (1, 8))
    spec = {"weights": [{"target": "type:Conv1D", "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = _sgm(
        transformers.GPT2LMHeadModel(cfg).eval(), spec, example_inputs=(ids,), example_kwargs={"use_cache": False}
    )
    dense, small, csr = sgm.squash(), sgm.squash(storage="bitmask"), sgm.squash(storage="csr")

    def logits(module: nn.Module) -> torch.Tensor:
        out = module(ids, use_cache=False)
        return getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)

    layers = [m for m in small.modules() if isinstance(m, BitmaskLinear)]
    assert len(layers) == 4 and all(m.transposed for m in layers)  # c_attn, c_proj, c_fc, mlp.c_proj
    torch.testing.assert_close(logits(small), logits(dense), atol=1e-5, rtol=1e-5)
    sd, want = small.state_dict(), dense.state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in sd)  # [in, out] weights again
    assert not any(isinstance(m, (BitmaskLinear, SparseLinear)) for m in csr.modules())
    assert "bitmask storage only" in {c.layer: c.why for c in csr.storage_choices}["transformer.h.0.mlp.c_fc"]
