"""l1_unstructured's keep mask for a large target is held by step() as its threshold (the k-th smallest |w| and how
many of the entries tied with it go), computed from the weight itself when the step writes it: nothing of the layer's
size while ranking or waiting for the other targets (the "mode": "inplace" memory goal, benchmarks/bench_memory.py).
The same entries as the bool selector and as a stable sort, ties lowest flat index first."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _masks
from fx_sparsify.methods import _selectors
from fx_sparsify.methods._global import prune_smallest_many, rank_smallest_many
from fx_sparsify.passes.update_masks import STEP_STRATEGIES, StepStrategy, StepWork, register_step_strategy
from fx_sparsify.state import TargetRecord

L1 = {"method": "l1_unstructured", "sparsity": 0.5}


def _reference(scores: torch.Tensor, k: int, absolute: bool) -> torch.Tensor:
    """The k smallest pruned, ties lowest flat index first: a stable sort of the whole tensor."""
    flat = scores.reshape(-1).double()
    order = torch.argsort(flat.abs() if absolute else flat, stable=True)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(scores.shape)


def _bits(mask: _masks.PendingMask) -> torch.Tensor:
    out = torch.empty(mask.shape, dtype=torch.bool)
    mask.unpack_into(out)
    return out


def _scores(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    if kind == "ties":
        return (x * 3).round()  # most values tied, zeros among them
    if kind == "pruned zeros":  # a repeated step over an "inplace" weight: half exact zeros
        return x.masked_fill(torch.rand(n, generator=g) < 0.5, 0.0)
    if kind == "one value":
        return torch.full((n,), -1.5)
    return x


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks, samples and tie pieces small enough that a few thousand entries take every path: many chunks, ties
    across chunk edges, a band ranked by the band search in turn, ties running out inside a chunk."""
    monkeypatch.setattr(_selectors, "CHUNK", 1024)
    monkeypatch.setattr(_selectors, "SMALL", 512)
    monkeypatch.setattr(_selectors, "SAMPLE", 256)
    monkeypatch.setattr(_selectors, "TIE_PIECE", 64)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("kind", ["random", "ties", "pruned zeros", "one value"])
@pytest.mark.parametrize("n", [300, 4099, 70_001])
def test_threshold_mask_prunes_what_a_stable_sort_and_the_bool_selector_prune(
    absolute: bool, kind: str, n: int
) -> None:
    scores = _scores(kind, n).view(-1, 1)
    for k in (1, n // 3, n // 2, n - 1):
        expected = _reference(scores, k, absolute)
        mask = _selectors.rank_smallest(scores, k, absolute=absolute)
        assert mask.shape == (n, 1)
        assert torch.equal(_bits(mask), expected), k
        assert torch.equal(_bits(mask.packed()), expected), k
        assert torch.equal(_selectors.prune_smallest(scores, k, absolute=absolute), expected), k


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("kind", ["random", "ties", "pruned zeros"])
def test_kth_and_below_is_kthvalue_and_its_count(kind: str) -> None:
    values = _scores(kind, 20_000)
    for k in (1, 777, 10_000, 19_999, 20_000):
        kth, below = _selectors.kth_and_below(values, k, absolute=True)
        assert float(kth) == float(torch.kthvalue(values.abs(), k).values)
        assert below == int((values.abs() < kth).sum())


def test_the_tie_scan_of_the_last_chunk_needs_no_index_list_of_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_selectors, "TIE_PIECE", 100)
    seen: list[int] = []
    original = torch.nonzero

    def counting(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(t.numel())
        return original(t, *args, **kwargs)  # type: ignore[arg-type]

    values = torch.zeros(10_000)
    kept = torch.ones(10_000, dtype=torch.bool)
    monkeypatch.setattr(torch, "nonzero", counting)
    assert _selectors.prune_ties(values, kept, torch.tensor(0.0), 5_050) == 0
    assert seen == [100] and int((~kept).sum()) == 5_050 and not kept[:5_050].any() and kept[5_050:].all()


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 512), nn.Linear(512, 8))  # 2 large targets, 1 small


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the threshold masks step() packs."""
    calls: list[tuple[int, ...]] = []
    original = _selectors.ThresholdMask.packed

    def packed(self: _selectors.ThresholdMask) -> _masks.PackedMask:
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(_selectors.ThresholdMask, "packed", packed)
    return calls


def _expected_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": _reference(m.weight.detach(), m.weight.numel() // 2, True)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize("inplace,mode", [(True, "inplace"), (False, "inplace"), (False, "graph")])
def test_step_holds_masks_of_weights_ranked_as_they_are_as_thresholds(
    counted: list[tuple[int, ...]], inplace: bool, mode: str
) -> None:
    model = _stack()
    expected = _expected_masks(model)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}], "mode": mode}, inplace=inplace)
    sgm.step()
    assert counted == []  # nothing packed: each mask computed from its weight as the step writes it
    for name, mask in expected.items():
        assert torch.equal(sgm.masks()[name], mask), name
    weight = sgm.get_parameter("0.weight")
    assert bool((weight[expected["0.weight"]] != 0).all())
    assert bool((weight[~expected["0.weight"]] == 0).all()) == (mode == "inplace")


def test_a_step_over_a_masked_copy_packs_it(counted: list[tuple[int, ...]]) -> None:
    """Graph mode's second step ranks ``weight * mask``, a copy: held as a threshold it would keep the copy alive."""
    model = _stack()
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}]})
    sgm.step()
    first = sgm.masks()
    sgm.step()
    assert counted == [(256, 512), (512, 256)]
    for name, mask in first.items():
        assert torch.equal(sgm.masks()[name], mask), name  # a repeated step at one sparsity changes nothing


@pytest.fixture
def table() -> Iterator[list[StepStrategy]]:
    saved = list(STEP_STRATEGIES)
    yield STEP_STRATEGIES
    STEP_STRATEGIES[:] = saved


def test_masks_are_packed_before_a_row_that_may_write_weights(
    table: list[StepStrategy], counted: list[tuple[int, ...]]
) -> None:
    """A ``together`` row may write weights as it goes (sequential SparseGPT, a channel plan, a registered row):
    the masks ranked before it keep the values they were ranked on."""
    model = _stack()
    expected = _expected_masks(model)

    def writes_a_weight(work: StepWork, records: list[TargetRecord]) -> None:
        work.gm.get_parameter("0.weight").mul_(-3.0).add_(1.0)
        for r in records:
            work.new_masks[r.name] = torch.ones(r.shape, dtype=torch.bool)

    register_step_strategy(StepStrategy("writer", lambda r: r.name == "2.weight", together=writes_a_weight))
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}]}, inplace=True)
    sgm.step()
    assert counted == [(256, 512), (512, 256)]
    assert torch.equal(sgm.masks()["0.weight"], expected["0.weight"])
    assert torch.equal(sgm.masks()["1.weight"], expected["1.weight"])


def test_no_pending_threshold_for_plain_rows_alone_with_a_global_rule(counted: list[tuple[int, ...]]) -> None:
    model = _stack()
    spec = {"weights": [{"target": "0", **L1}, {"target": "1", **L1}], "global": [{"targets": ["2"], **L1}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    assert counted == []  # the global row writes no weight: nothing to pack first


def test_a_weight_written_while_the_step_ranks_is_refused_and_nothing_written(table: list[StepStrategy]) -> None:
    model = _stack()
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}]}, inplace=True)
    before = {n: m.clone() for n, m in sgm.masks().items()}

    def meddles(work: StepWork, record: TargetRecord) -> None:  # runs after 0.weight was ranked
        work.gm.get_parameter("0.weight").add_(1.0)
        work.new_masks[record.name] = torch.ones(record.shape, dtype=torch.bool)

    register_step_strategy(StepStrategy("meddler", lambda r: r.name == "2.weight", each=meddles))
    with pytest.raises(RuntimeError, match=r"'0\.weight' changed while step\(\) ranked them.*nothing was written"):
        sgm.step()
    assert all(torch.equal(sgm.masks()[n], m) for n, m in before.items())
    assert sgm._fxs.steps == 0


def test_a_step_under_inference_mode_holds_its_thresholds_too(counted: list[tuple[int, ...]]) -> None:
    """Inference tensors count no versions (reading one raised): the unchanged-weight check is skipped for them."""
    with torch.inference_mode():
        model = _stack()
        expected = _expected_masks(model)
        sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}], "mode": "inplace"}, inplace=True)
        sgm.step()
        assert counted == []
        for name, mask in expected.items():
            assert torch.equal(sgm.masks()[name], mask), name


# --- global rules ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("kind", ["random", "ties", "pruned zeros"])
@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.97])
def test_global_thresholds_prune_what_the_concatenation_prunes(absolute: bool, kind: str, fraction: float) -> None:
    """Each tensor's threshold mask (the shared k-th value, its own share of the ties, lowest index of the
    concatenation first) equals the bool masks of the concatenation, float64 and bfloat16 compared as float32."""
    tensors = [_scores(kind, 3000).view(60, 50), _scores(kind, 2100), _scores(kind, 1500).view(30, 50)]
    tensors[1] = (tensors[1] + 1e-12).double()  # equal as float32: ties there, as in a float32 concatenation
    tensors[2] = tensors[2].to(torch.bfloat16)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    k = max(1, round(fraction * flat.numel()))
    expected = _reference(flat, k, absolute).split([t.numel() for t in tensors])
    got = rank_smallest_many(tensors, k, absolute=absolute)
    old = prune_smallest_many(tensors, k, absolute=absolute)
    for mask, before, want, t in zip(got, old, expected, tensors):
        assert isinstance(mask, _selectors.ThresholdMask) and mask.shape == tuple(t.shape)
        assert torch.equal(_bits(mask).reshape(-1), want) and torch.equal(before.reshape(-1), want)


@pytest.mark.parametrize("mode", ["inplace", "graph"])
def test_a_global_step_holds_thresholds_and_keeps_its_masks(counted: list[tuple[int, ...]], mode: str) -> None:
    model = _stack()
    weights = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    flat = torch.cat([w.reshape(-1) for w in weights])
    expected = _reference(flat, flat.numel() // 2, True).split([w.numel() for w in weights])
    spec = {"global": [{"targets": ["type:Linear"], **L1}], "mode": mode}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    assert counted == []  # ranked from the weights themselves: nothing packed
    for name, want in zip(["0.weight", "1.weight", "2.weight"], expected):
        assert torch.equal(sgm.masks()[name].reshape(-1), want), name
    if mode == "graph":  # a second step ranks weight * mask, copies: packed, and the same masks
        sgm.step()
        assert counted == [(256, 512), (512, 256), (8, 512)]
        for name, want in zip(["0.weight", "1.weight", "2.weight"], expected):
            assert torch.equal(sgm.masks()[name].reshape(-1), want), name


@pytest.mark.parametrize("width", [8, 512])  # a small target, and one whose mask would be held as a threshold
def test_a_step_on_the_meta_device_names_the_weights_and_changes_nothing(width: int) -> None:
    """A model built on the meta device has no values to rank: step() says so (it failed inside torch's item())."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 8))
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}], "mode": "inplace"})
    with pytest.raises(ValueError, match=r"'0\.weight', '2\.weight'.*meta device.*before sparsify_graph.*to_empty"):
        sgm.step()
    assert sgm._fxs.steps == 0
