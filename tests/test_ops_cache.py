"""The eval cache of ``weight * mask`` is bounded (SPEC §15): it never silently doubles a large model."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import ops

from models import MLP

X = torch.randn(4, 16)
SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


@pytest.fixture(autouse=True)
def restore_limit() -> Iterator[None]:
    old = ops.cache_limit()
    yield
    fxs.set_cache_limit(old)


def _eval_forward(sgm: fxs.SparseGraphModule) -> torch.Tensor:
    sgm.eval()
    with torch.no_grad():
        return sgm(X)


def test_default_bound_is_256_mib_and_small_models_are_cached() -> None:
    assert ops.cache_limit() == ops.DEFAULT_CACHE_LIMIT == 1 << 28
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    fxs.set_cache_limit(ops.DEFAULT_CACHE_LIMIT)  # start empty
    _eval_forward(sgm)
    weights = sum(sgm.get_parameter(r.param).nbytes for r in sgm._fxs.targets.values())
    assert ops.cached_bytes() == weights


def test_the_bound_caps_the_cache_and_outputs_do_not_change() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    fxs.set_cache_limit(None)
    expected = _eval_forward(sgm)
    # fc1 is reached first and fits, fc2 would pass the bound, head still fits after it
    fxs.set_cache_limit(sgm.fc1.weight.nbytes + sgm.fc2.weight.nbytes - 1)
    for _ in range(2):
        torch.testing.assert_close(_eval_forward(sgm), expected, rtol=0, atol=0)
        assert ops.cached_bytes() == sgm.fc1.weight.nbytes + sgm.head.weight.nbytes
    fxs.set_cache_limit(0)
    torch.testing.assert_close(_eval_forward(sgm), expected, rtol=0, atol=0)
    assert ops.cached_bytes() == 0


def test_squash_frees_the_cache() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    fxs.set_cache_limit(None)
    _eval_forward(sgm)
    assert ops.cached_bytes() > 0
    sgm.squash()
    assert ops.cached_bytes() == 0


def test_inplace_mode_caches_nothing() -> None:
    sgm = fxs.sparsify_graph(MLP(), {**SPEC, "mode": "inplace"})
    sgm.step()
    fxs.set_cache_limit(None)
    _eval_forward(sgm)
    assert ops.cached_bytes() == 0


def test_an_embedding_table_past_the_bound_is_looked_up_row_by_row() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.bag = nn.EmbeddingBag(50, 8, mode="sum")

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.emb(i).sum(1) + self.bag(i)

    spec = {
        "weights": [
            {"target": "type:Embedding", "method": "l1_unstructured", "sparsity": 0.5},
            {"target": "type:EmbeddingBag", "method": "l1_unstructured", "sparsity": 0.5},
        ]
    }
    sgm = fxs.sparsify_graph(Bag(), spec).eval()
    sgm.step()
    i = torch.randint(0, 50, (3, 4))
    fxs.set_cache_limit(None)
    with torch.no_grad():
        expected = sgm(i)
    fxs.set_cache_limit(0)
    with torch.no_grad():
        torch.testing.assert_close(sgm(i), expected)
    assert ops.cached_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB"])
def test_a_bad_bound_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="byte count"):
        fxs.set_cache_limit(bad)  # type: ignore[arg-type]


def test_the_byte_count_follows_entries_that_go_stale_or_die() -> None:
    """cached_bytes() is a running count (no walk over the cache per miss): a weight edited after caching
    replaces its entry, a sparse module that is garbage collected takes its entries with it."""
    import gc

    fxs.set_cache_limit(None)
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    sgm.step()
    _eval_forward(sgm)
    full = ops.cached_bytes()
    assert full == sum(sgm.get_parameter(r.param).nbytes for r in sgm._fxs.targets.values())
    with torch.no_grad():
        sgm.fc1.weight.add_(1.0)  # a new version: the next forward recomputes fc1's entry
    _eval_forward(sgm)
    assert ops.cached_bytes() == full
    other = fxs.sparsify_graph(MLP(), SPEC)
    other.step()
    _eval_forward(other)
    assert ops.cached_bytes() == 2 * full
    del other
    gc.collect()
    assert ops.cached_bytes() == full
    ops.drop_cache([sgm.get_buffer(r.buffer) for r in sgm._fxs.targets.values()])
    assert ops.cached_bytes() == 0
