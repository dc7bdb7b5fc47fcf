"""SparseGPT's column sweep (fx_sparsify/methods/sparsegpt.py) on small Linear weights."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.methods import count_to_prune
from fx_sparsify.methods.sparsegpt import sparsegpt_prune


def _layer(rows: int = 24, cols: int = 64, samples: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs (``in × samples``) like a language model's: correlated features (off-diagonal
    Hessian, so OBS updates matter) of very different scales (outlier features, so magnitude misleads)."""
    w = torch.randn(rows, cols, dtype=torch.float64)
    mix = torch.randn(cols, cols, dtype=torch.float64) / math.sqrt(cols) + torch.eye(cols, dtype=torch.float64)
    scale = torch.exp(torch.randn(cols, 1, dtype=torch.float64))
    x = scale * (mix @ torch.randn(cols, samples, dtype=torch.float64))
    return w, x


@functools.cache
def _reference_fasterprune() -> Callable[..., torch.Tensor]:
    """The transcription of SparseGPT's ``fasterprune`` that benchmarks/bench_quality.py runs (one copy of it)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.reference_fasterprune


def test_reconstruction_reduces_the_output_error_versus_masking_alone() -> None:
    w, x = _layer()
    keep, new = sparsegpt_prune(w, 2 * x @ x.T, sparsity=0.5, block_size=16)
    err = lambda v: float(torch.linalg.norm(w @ x - v @ x))  # noqa: E731
    magnitude = fxs.compute_mask("l1_unstructured", w, sparsity=0.5)
    assert err(new) < 0.92 * err(w * keep)  # the update, not only the mask, does the work
    assert err(new) < 0.5 * err(w * magnitude)
    assert torch.all(new[~keep] == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_holds_and_equals_the_reference_implementation(n: int, m: int) -> None:
    w, x = _layer(cols=64)
    h = 2 * x @ x.T
    keep, new = sparsegpt_prune(w, h, n=n, m=m, block_size=32)
    groups = keep.reshape(w.shape[0], -1, m)
    assert torch.all(groups.sum(-1) == n)
    reference = _reference_fasterprune()(w, h, 0.0, m - n, m, blocksize=32)
    torch.testing.assert_close(new, reference, rtol=1e-9, atol=1e-9)


def test_identity_covariance_reduces_to_magnitude_pruning() -> None:
    w = torch.randn(16, 32)
    x = 3.0 * torch.eye(32)  # X·Xᵀ = 9·I: no correlation between inputs, so nothing to compensate
    keep, new = sparsegpt_prune(w, 2 * x @ x.T, sparsity=0.5, block_size=32)
    assert torch.equal(keep, fxs.compute_mask("l1_unstructured", w, sparsity=0.5))
    assert torch.equal(new, w * keep)  # no update: off-diagonal H⁻¹ entries are exactly zero
    keep_nm, new_nm = sparsegpt_prune(w, 2 * x @ x.T, n=2, m=4)
    assert torch.equal(keep_nm, fxs.compute_mask("nm", w, n=2, m=4))
    assert torch.equal(new_nm, w * keep_nm)
    # a bare tensor (no calibration data) is the identity case
    assert torch.equal(fxs.compute_mask("sparsegpt", w, sparsity=0.5, block_size=32), keep)


@pytest.mark.parametrize("block_size", [7, 128])
def test_exact_sparsity_counts(block_size: int) -> None:
    w, x = _layer(rows=10, cols=40, samples=128)
    for sparsity in (0.3, 0.37, 0.5, 0.9, 0.0, 1.0, 101):
        keep, new = sparsegpt_prune(w, x @ x.T, sparsity=sparsity, block_size=block_size)
        assert int((~keep).sum()) == count_to_prune(sparsity, w.numel()), sparsity
        assert torch.all(new[~keep] == 0)


def test_pruned_entries_stay_pruned_at_the_same_sparsity_and_count_toward_a_higher_one() -> None:
    w, x = _layer(rows=12, cols=48)
    h = x @ x.T
    keep, new = sparsegpt_prune(w, h, sparsity=0.4, block_size=16)
    again, _ = sparsegpt_prune(new, h, sparsity=0.4, block_size=16, keep=keep)
    assert torch.equal(again, keep)
    more, _ = sparsegpt_prune(new, h, sparsity=0.6, block_size=16, keep=keep)
    assert not torch.any(more & ~keep)
    assert int((~more).sum()) == count_to_prune(0.6, w.numel())


def test_dead_inputs_and_float64_hessian() -> None:
    w, x = _layer(rows=8, cols=16)
    x[3] = 0  # an input that is always zero: its weights cost nothing on the data
    keep, new = sparsegpt_prune(w.float(), (x @ x.T), sparsity=0.5, block_size=8)
    assert new.dtype == torch.float32 and torch.isfinite(new).all()
    assert not keep[:, 3].any()
    assert int((~keep).sum()) == 64


def test_half_precision_weight_comes_back_in_its_dtype() -> None:
    w, x = _layer(rows=8, cols=16)
    keep, new = sparsegpt_prune(w.to(torch.bfloat16), (x @ x.T).float(), n=2, m=4, block_size=16)
    assert new.dtype == torch.bfloat16 and torch.all(new[~keep] == 0)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"sparsity": 0.5, "n": 2, "m": 4}, TypeError, "either sparsity"),
        ({}, TypeError, "either sparsity"),
        ({"n": 2}, TypeError, "go together"),
        ({"n": 2, "m": 4, "block_size": 6}, ValueError, "multiple of m=4"),
        ({"sparsity": 0.5, "damp": -1.0}, ValueError, "damp"),
        ({"sparsity": 0.5, "hessian_dtype": "float16"}, ValueError, "hessian_dtype"),
        ({"sparsity": 1.5}, ValueError, "fraction"),
    ],
)
def test_option_errors_come_when_the_spec_is_built(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fxs.SparsitySpec.from_dict({"weights": [{"target": "fc1", "method": "sparsegpt", **options}]})


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="a Linear weight"):
        fxs.compute_mask("sparsegpt", torch.randn(8), sparsity=0.5)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        fxs.compute_mask("sparsegpt", torch.randn(4, 6), n=2, m=4)
    conv = torch.randn(4, 2, 2, 2)  # a Conv2d weight: N:M along in_channels × kernel, as its unfolded input
    assert torch.equal(
        fxs.compute_mask("sparsegpt", conv, n=2, m=4),
        fxs.compute_mask("nm", conv.reshape(4, 8), n=2, m=4).reshape(4, 2, 2, 2),
    )


def test_a_singular_hessian_without_damping_is_an_error_saying_what_to_do() -> None:
    w = torch.randn(4, 8)
    x = torch.randn(8, 1)
    h = x @ x.T
    with pytest.raises(ValueError, match="raise 'damp'"):
        sparsegpt_prune(w, h - 2 * torch.diag(h.diagonal()), sparsity=0.5, damp=0.0)


def test_a_tied_lm_head_selected_by_type_names_the_tie_and_the_way_out() -> None:
    """'type:Linear' selects a head tied to the embedding (GPT-2): the target is named after the embedding,
    so the error says which selected layer it is and how to exclude it; doing so works."""

    class TiedLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(self.emb(ids))))

    rule = {"target": "type:Linear", "method": "sparsegpt", "sparsity": 0.5}
    with pytest.raises(
        ValueError, match=r"one tensor with 'head.weight' \(tied.*\{'target': 'head', 'method': 'dense'\}"
    ):
        fxs.sparsify_graph(TiedLM(), {"weights": [rule]})
    sgm = fxs.sparsify_graph(TiedLM(), {"weights": [rule, {"target": "head", "method": "dense"}]})
    sgm(torch.randint(0, 10, (4, 5)))
    sgm.step()
    assert sgm.sparsity() == {"fc.weight": 0.5}
