"""Sparse storage at squash (SPEC §11): CSR / BSR layers equal the dense squash, keep dense state dicts."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _native
from fx_sparsify._bitmask import BitmaskLinear
from fx_sparsify.passes import sparse_storage
from fx_sparsify.passes.sparse_storage import SparseLinear, _block_of

from models import MLP

LINEAR_80 = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.8}]}


def _sgm(model: nn.Module, spec: dict[str, Any] = LINEAR_80, **kwargs: Any) -> fxs.SparseGraphModule:
    sgm = fxs.sparsify_graph(model, spec, **kwargs)
    sgm.step()
    return sgm


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].layout == torch.strided and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make ``auto`` deterministic: each measurement returns dense 1.0 s and sparse the next ratio given."""
    ratios: list[float] = []

    def measure(dense: torch.Tensor, bias: torch.Tensor | None, layer: SparseLinear, batch: int) -> tuple[float, float]:
        return 1.0, ratios.pop(0) if ratios else 0.5

    monkeypatch.setattr(sparse_storage, "MEASURE", measure)
    return ratios


@pytest.mark.parametrize("storage", ["csr", "bsr"])
def test_sparse_layers_equal_the_dense_squash(storage: str) -> None:
    sgm = _sgm(MLP())
    dense, sparse = sgm.squash(), sgm.squash(storage=storage)
    assert all(isinstance(sparse.get_submodule(n), SparseLinear) for n in ("fc1", "fc2", "head"))
    for x in (torch.randn(1, 16), torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(16)):
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
    assert sparse.fc1.weight.layout == (torch.sparse_csr if storage == "csr" else torch.sparse_bsr)
    assert sparse.fc1.crow_indices.dtype == torch.int32 and sparse.fc1.col_indices.dtype == torch.int32
    _assert_same_state(sparse, dense)  # dense weights under the original keys


def test_state_dict_loads_both_ways_and_copies_work(tmp_path: Path) -> None:
    model = MLP()
    sgm = _sgm(model)
    dense, sparse = sgm.squash(), sgm.squash(storage="csr")
    eager = MLP()
    eager.load_state_dict(sparse.state_dict())  # the user's eager model takes the sparse module's weights
    x = torch.randn(4, 16)
    torch.testing.assert_close(eager(x), dense(x))
    other = _sgm(MLP()).squash(storage="csr")
    other.load_state_dict(dense.state_dict())  # dense weights in, re-sparsified
    torch.testing.assert_close(other(x), dense(x), atol=1e-5, rtol=1e-5)
    assert other.fc1.values.numel() == int((dense.fc1.weight != 0).sum())
    with pytest.raises(RuntimeError, match="Missing key.*fc1.weight"):
        other.load_state_dict({k: v for k, v in dense.state_dict().items() if k != "fc1.weight"})
    with pytest.raises(RuntimeError, match="size mismatch for fc1.weight"):
        other.load_state_dict({**dense.state_dict(), "fc1.weight": torch.zeros(3, 3)})
    torch.testing.assert_close(copy.deepcopy(sparse)(x), sparse(x))
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), sparse(x))
    fxs.save_compressed(sparse, tmp_path / "m.safetensors")
    torch.testing.assert_close(fxs.load_compressed(tmp_path / "m.safetensors", MLP())(x), dense(x))


def test_export_capture_linear_calls_become_sparse_layers() -> None:
    x = torch.randn(2, 16)
    sgm = _sgm(MLP(), capture="export", example_inputs=(x,))
    dense, sparse = sgm.squash(), sgm.squash(storage="csr")
    assert "aten.linear" in dense.code and "aten.linear" not in sparse.code
    assert isinstance(sparse.fc1, SparseLinear)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
    _assert_same_state(sparse, dense)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(8, 16, 1)
        self.k3 = nn.Conv2d(16, 16, 3, padding=1)
        self.strided = nn.Conv2d(16, 8, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.strided(torch.relu(self.k3(torch.relu(self.pw(x)))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pointwise_convs_take_sparse_storage_others_say_why_not(capture: str) -> None:
    x = torch.randn(2, 8, 6, 6)
    spec = {"weights": [{"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.75}]}
    sgm = _sgm(ConvNet(), spec, capture=capture, example_inputs=(x,))
    dense, sparse = sgm.squash(), sgm.squash(storage="csr")
    assert isinstance(sparse.pw, SparseLinear) and sparse.pw.spatial == 2
    assert not isinstance(sparse.get_submodule("k3"), SparseLinear)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
    if capture == "fx":
        torch.testing.assert_close(sparse.pw(x[0]), dense.pw(x[0]), atol=1e-5, rtol=1e-5)  # unbatched input
    _assert_same_state(sparse, dense)
    why = {c.layer: c.why for c in sparse.storage_choices}
    assert "3x3 conv" in why["k3"] and "stride" in why["strided"]


def test_bsr_takes_the_largest_exact_square_block() -> None:
    w = torch.randn(4, 6).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 32x48 of 8x8 blocks
    w[:8, :8] = 0
    w[8:16, 16:24] = 0
    assert _block_of(w) == 8
    w[0, 9] = 0  # one zero inside a kept block: 8x8 no longer exact
    assert _block_of(w) == 1
    spec = {"weights": [{"target": "type:Linear", "method": "block", "sparsity": 0.5, "block_shape": (4, 4)}]}
    sgm = _sgm(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)), spec)
    sparse = sgm.squash(storage="bsr")
    assert sparse.get_submodule("0").blocksize >= 4
    x = torch.randn(3, 32)
    torch.testing.assert_close(sparse(x), sgm.squash()(x), atol=1e-5, rtol=1e-5)


def test_auto_takes_sparse_only_where_measured_faster(fake_timing: list[float]) -> None:
    spec = {
        "weights": [
            {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.9},
            {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.9},
            {"target": "head", "method": "l1_unstructured", "sparsity": 0.1},
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    sgm.step()
    bitmask = _native.LIB is not None  # the bitmask layer is a candidate where its C kernel is built
    # fc1 measured csr 0.4x dense (bitmask 0.95x), fc2 csr 0.95x (bitmask 0.97x); head is never measured
    fake_timing.extend([0.4, 0.95, 0.95, 0.97] if bitmask else [0.4, 0.95])
    sparse = sgm.squash(storage="auto", batch_size=8)
    assert isinstance(sparse.fc1, SparseLinear)
    assert not isinstance(sparse.fc2, (SparseLinear, BitmaskLinear)) and not isinstance(sparse.head, SparseLinear)
    assert fake_timing == []
    why = {c.layer: (c.storage, c.why) for c in sparse.storage_choices}
    measured = "measured csr 0.40x, bitmask 0.95x" if bitmask else "measured csr 0.40x"
    assert why["fc1"] == ("csr", f"{measured} dense at batch 8")
    assert {c.layer: c.ratio for c in sparse.storage_choices} == {"fc1": 0.4, "fc2": 0.95, "head": None}
    assert why["fc2"][0] == "dense" and "csr 0.95x" in why["fc2"][1]
    assert why["head"][0] == "dense" and "cost model" in why["head"][1]
    report = sgm.report()
    assert "storage at the last squash" in report and f"{measured} dense at batch 8" in report
    x = torch.randn(8, 16)
    torch.testing.assert_close(sparse(x), sgm.squash()(x), atol=1e-5, rtol=1e-5)


def test_auto_measures_for_real_and_stays_equal() -> None:
    sgm = _sgm(MLP())
    sparse = sgm.squash(storage="auto", batch_size=4)
    assert {c.layer for c in sparse.storage_choices} == {"fc1", "fc2", "head"}
    assert all(c.why.startswith("measured csr") for c in sparse.storage_choices)
    x = torch.randn(4, 16)
    torch.testing.assert_close(sparse(x), sgm.squash()(x), atol=1e-5, rtol=1e-5)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.c(x) * self.c.weight.sum()


def test_tied_weights_and_weights_read_elsewhere_stay_dense() -> None:
    spec = {
        "weights": [
            {"target": "a", "method": "l1_unstructured", "sparsity": 0.8},
            {"target": "c", "method": "l1_unstructured", "sparsity": 0.8},
        ]
    }
    sgm = _sgm(Tied(), spec)
    sparse = sgm.squash(storage="csr")
    why = {c.layer: (c.storage, c.why) for c in sparse.storage_choices}
    assert why["c"] == ("dense", "its weight is read outside the layer call")
    assert why["a"][0] == "dense" and "tied" in why["a"][1]
    assert not any(isinstance(m, SparseLinear) for m in sparse.modules())
    x = torch.randn(2, 8)
    torch.testing.assert_close(sparse(x), sgm.squash()(x))


def test_unmasked_and_low_precision_layers_stay_dense() -> None:
    model = MLP().to(torch.bfloat16)
    sgm = _sgm(model, {"weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.8}]})
    sparse = sgm.squash(storage="csr")
    why = {c.layer: c.why for c in sparse.storage_choices}
    assert "no CPU sparse kernel" in why["fc1"] and why["fc2"] == "not a masked weight"


def test_a_later_half_computes_dense_and_no_bias_works() -> None:
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4))
    sgm = _sgm(model)
    dense, sparse = sgm.squash(), sgm.squash(storage="csr")
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.double()(x.double()), dense.double()(x.double()))
    torch.testing.assert_close(sparse.half()(x.half()), dense.half()(x.half()))  # no CPU half kernel: dense


def test_a_fully_pruned_layer() -> None:
    sgm = _sgm(MLP(), {"weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 1.0}]})
    sparse = sgm.squash(storage="csr")
    assert sparse.fc2.values.numel() == 0
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), sgm.squash()(x))
    torch.testing.assert_close(sparse(x[:1]), sgm.squash()(x[:1]))


def test_torch_export_of_sparse_storage_says_use_dense() -> None:
    sparse = _sgm(MLP()).squash(storage="csr")
    with pytest.raises(Exception, match="storage='dense'"):
        torch.export.export(sparse, (torch.randn(2, 16),))


def test_bad_storage_arguments() -> None:
    sgm = _sgm(MLP())
    with pytest.raises(
        ValueError, match=r"unknown storage; use one of 'dense', 'csr', 'bsr', 'bitmask', 'auto', 'auto-model'"
    ):
        sgm.squash(storage="coo")
    with pytest.raises(TypeError, match="positive int"):
        sgm.squash(storage="auto", batch_size=0)
    with pytest.raises(ValueError, match="CUDA GPUs in float16 / bfloat16 only; this module is on cpu"):
        sgm.squash(storage="semi_structured")
    assert sgm._fxs.storage is None  # nothing was recorded by the failed calls


def test_function_form_passes_storage_through() -> None:
    sgm = _sgm(MLP())
    sparse = fxs.squash(sgm, storage="csr")
    assert isinstance(sparse.fc1, SparseLinear)


# --- storage="semi_structured" (2:4 on CUDA) ---------------------------------------------------------------
def test_semi_structured_problem_says_why_a_weight_cannot_be_2_4() -> None:
    from fx_sparsify.passes._semi_structured import semi_structured_problem

    two_four = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, -4.0]]).repeat(32, 8)  # 32x64: CUTLASS's tile
    assert semi_structured_problem(two_four.half()) is None
    assert semi_structured_problem(two_four.bfloat16()) is None
    assert "float32" in semi_structured_problem(two_four) and ".half()" in semi_structured_problem(two_four)
    dense_group = two_four.clone()
    dense_group[1, 5] = 7.0  # three non-zeros in columns 4..7 of row 1
    msg = semi_structured_problem(dense_group.half())
    assert msg is not None and "row 1 has 3 non-zeros in columns 4..7" in msg and "'2:4'" in msg
    assert "multiple of 4" in semi_structured_problem(torch.zeros(2, 6, dtype=torch.float16))
    # shapes torch's kernels refuse, from torch's own table for the backend to_sparse_semi_structured picks
    from torch.sparse import SparseSemiStructuredTensor

    for force_cutlass, (rows, cols) in ((False, (16, 16)), (True, (32, 64))):
        SparseSemiStructuredTensor._FORCE_CUTLASS, before = force_cutlass, SparseSemiStructuredTensor._FORCE_CUTLASS
        try:
            assert semi_structured_problem(two_four[:rows, :cols].half()) is None
            msg = semi_structured_problem(two_four[: rows // 2, :cols].half())
            assert msg is not None and f"multiple of {rows} and in_features a multiple of {cols}" in msg
            assert "storage='csr'" in msg
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = before


def test_semi_structured_on_the_cpu_says_to_use_cuda_or_csr() -> None:
    sgm = _sgm(MLP(), {"weights": [{"target": "type:Linear", "method": "2:4"}]})
    with pytest.raises(
        ValueError,
        match=r"CUDA GPUs in float16 / bfloat16 only; this module is on cpu: .*"
        r"model\.cuda\(\)\.half\(\).*storage='csr' / 'auto'",
    ):
        sgm.squash(storage="semi_structured")
    assert sgm._fxs.storage is None


class _Wide(nn.Module):
    """Linear layers whose shapes meet the semi-structured kernels' minimum tiles (multiples of 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0+",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_on_cuda_equals_the_dense_squash(dtype: torch.dtype) -> None:
    from fx_sparsify.passes._semi_structured import SemiStructuredLinear

    torch.manual_seed(0)
    model = _Wide().cuda().to(dtype).eval()
    sgm = _sgm(model, {"weights": [{"target": "type:Linear", "method": "2:4"}]})
    dense, semi = sgm.squash(), sgm.squash(storage="semi_structured")
    assert all(isinstance(semi.get_submodule(n), SemiStructuredLinear) for n in ("fc1", "fc2", "head"))
    assert [c.storage for c in semi.storage_choices] == ["semi_structured"] * 3
    with torch.inference_mode():
        for x in (torch.randn(8, 128), torch.randn(1, 128), torch.randn(2, 5, 128), torch.randn(128, 8).T):
            x = x.to("cuda", dtype)
            torch.testing.assert_close(semi(x), dense(x), atol=2e-2, rtol=2e-2)
    _assert_same_state(semi, dense)  # dense weights under the original keys, bit-exact
    semi.load_state_dict(dense.state_dict())  # re-converted
    with torch.inference_mode():
        x = torch.randn(4, 128, device="cuda", dtype=dtype)
        torch.testing.assert_close(semi(x), dense(x), atol=2e-2, rtol=2e-2)
    fp32 = _sgm(_Wide().cuda().eval(), {"weights": [{"target": "type:Linear", "method": "2:4"}]})
    with pytest.raises(
        ValueError,
        match=r"layer 'fc1' cannot be stored 2:4 semi-structured: its weight is "
        r"torch\.float32",
    ):
        fp32.squash(storage="semi_structured")
    unstructured = _sgm(_Wide().cuda().to(dtype).eval(), LINEAR_80)
    with pytest.raises(ValueError, match=r"is not 2:4 sparse.*storage='dense' / 'csr'"):
        unstructured.squash(storage="semi_structured")
